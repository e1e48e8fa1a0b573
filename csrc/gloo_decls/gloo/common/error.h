// Declarations for ProcessGroupGloo.hpp (see ../../README.md): nothing from this header is used.
#pragma once

// gloo/algorithm.h: included by ProcessGroupGloo.hpp, which uses nothing from it.
#pragma once
#include <gloo/context.h>

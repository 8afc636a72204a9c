// Included right after a `#pragma GCC target(...)` that enables at least AVX2 + FMA, before
// any other include. GCC's C++ front end does not define the ISA macros for a target pragma
// (its C one does); headers (sleef.h, ATen's Vectorized) test them, so define them as the
// matching -m flags would.
#pragma once

#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#ifndef __BMI__
#define __BMI__ 1
#endif
#ifndef __BMI2__
#define __BMI2__ 1
#endif

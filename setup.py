"""Only the compiled scoring kernel lives here; everything else is in pyproject.toml. The build is
optional: without a C compiler the package installs and serves with the numba kernels."""

from setuptools import Extension, setup

# No -march: each SIMD kernel carries its own target attribute, so one build runs on any CPU of the
# architecture and picks the best kernel at run time.
setup(ext_modules=[Extension("gnaq_stream.serve._fastscan", ["gnaq_stream/serve/_fastscan.c"],
                             extra_compile_args=["-O3"], optional=True)])

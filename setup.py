"""Build of the cpp backend: csrc/*.cpp -> fastvae._C (pybind11 + OpenMP, no libtorch).

The Triton kernels in kernels/ install as the subpackage fastvae.kernels.
FASTVAE_NATIVE=1 adds -march=native for a local build; the default binary is
portable and picks AVX-512/AVX2 code paths at load time (target_clones).
FASTVAE_SANITIZE=1 builds with AddressSanitizer and UndefinedBehaviorSanitizer
(any report aborts); load it with libasan preloaded, as .ci/sanitize does.
"""
import os
import sys
from glob import glob

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

# No errno or FP-exception semantics is what lets GCC if-convert and vectorize
# the branch-free exp/log/cos; NaN and inf behaviour is unchanged (not -ffast-math).
compile_args = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
link_args = ["-fopenmp"]
if os.environ.get("FASTVAE_NATIVE") == "1":
    compile_args.append("-march=native")
if os.environ.get("FASTVAE_SANITIZE") == "1":
    sanitize = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
    # Python's own CFLAGS carry -fwrapv, which defines signed overflow and so
    # turns UBSan's check of it off: an overflowing index would go unreported
    compile_args = [a for a in compile_args if a != "-O3"] + ["-O1", "-g", "-fno-omit-frame-pointer",
                                                              "-fno-wrapv", *sanitize]
    link_args = [*link_args, *sanitize]
if sys.platform == "darwin":  # Apple clang: OpenMP comes from libomp
    compile_args = ["-O3", "-Xpreprocessor", "-fopenmp"]
    link_args = ["-lomp"]

ext = Pybind11Extension(
    "fastvae._C",
    sorted(glob("csrc/*.cpp")),
    include_dirs=["csrc"],
    depends=sorted(glob("csrc/*.h")),
    extra_compile_args=compile_args,
    extra_link_args=link_args,
    cxx_std=17,
)

setup(
    packages=["fastvae", "fastvae.kernels"],
    package_dir={"fastvae": "fastvae", "fastvae.kernels": "kernels"},
    ext_modules=[ext],
    cmdclass={"build_ext": build_ext},
)

"""Build of the cpp backend: csrc/*.cpp -> fastvae._C (pybind11 + OpenMP).

csrc/torch_ops.cpp, the eager CPU operators with C++ autograd (fastvae_cpp::*),
links libtorch: it is built against the torch installed in the interpreter
that runs the build, found even inside pip's isolated build environment, and
left out (with a warning; the Python path then serves every call) when there
is none, or with FASTVAE_TORCH_OPS=0. The rest of the extension uses no torch
headers. pyproject.toml's comment on the build requirements says why torch is
not one of them.

The Triton kernels in kernels/ install as the subpackage fastvae.kernels.
FASTVAE_NATIVE=1 adds -march=native for a local build; the default binary is
portable and picks AVX-512/AVX2 code paths at load time (target_clones).
The sources compile in parallel, one job per core (pybind11's ParallelCompile;
FASTVAE_BUILD_JOBS=N sets the count); `pip install -v` shows each compile.
FASTVAE_SANITIZE=1 builds with AddressSanitizer and UndefinedBehaviorSanitizer
(any report aborts); load it with libasan preloaded, as .ci/sanitize does.
"""
import json
import os
import subprocess
import sys
from glob import glob

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext
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
    # The release build's -O3: GCC's multiply-add contractions (FMA) differ
    # between -O1, -O2 and -O3, and the tests check the compiled loops bit for
    # bit against the hand-written FMA code of csrc/avx2_math.h, as they hold
    # in the release build
    compile_args = [*compile_args, "-g", "-fno-omit-frame-pointer", "-fno-wrapv", *sanitize]
    link_args = [*link_args, *sanitize]
if sys.platform == "darwin":  # Apple clang: OpenMP comes from libomp
    compile_args = ["-O3", "-Xpreprocessor", "-fopenmp"]
    link_args = ["-lomp"]


def installed_torch():
    """(include dirs, library dirs, cxx11 ABI flag) of the torch that fastvae
    will run with, or None. pip builds in an isolated environment that hides
    the target's site-packages; -E (ignore PYTHONPATH, which sets up that
    isolation) shows them again, so the build links the torch already
    installed, never a second download."""
    code = ("import json, torch, torch.utils.cpp_extension as c; "
            "print(json.dumps([c.include_paths(), c.library_paths(), int(torch._C._GLIBCXX_USE_CXX11_ABI)]))")
    try:
        found = subprocess.run([sys.executable, "-E", "-c", code], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return json.loads(found.stdout.strip().splitlines()[-1])


def install_parallel_compile():
    """Compile the sources in parallel, one compiler per core (pybind11's
    ParallelCompile; FASTVAE_BUILD_JOBS=N overrides the count), flags unchanged.
    The slowest files start first, so that no long compile runs alone at the
    end: torch_ops.cpp (libtorch's headers) and the pybind11 unit take several
    times a kernel's time. The objects are returned, and so linked, in the
    original order: the bindings register in static-initialization order."""
    import distutils.ccompiler

    parallel = ParallelCompile("FASTVAE_BUILD_JOBS", default=0).function()

    def cost(src):
        name = os.path.basename(src)
        return 2 if name in ("torch_ops.cpp", BINDINGS_TU) else 0

    def compile_slowest_first(compiler, sources, *args, **kwargs):
        order = sorted(sources, key=cost, reverse=True)
        objects = dict(zip(order, parallel(compiler, order, *args, **kwargs)))
        return [objects[s] for s in sources]

    distutils.ccompiler.CCompiler.compile = compile_slowest_first


BINDINGS_TU = "fastvae_bindings.cpp"


def bindings_as_one_unit(sources):
    """The sources with the pybind11 files (bindings.cpp and every *_bind.cpp)
    replaced by one generated translation unit that includes them all. Each
    pybind11 file compiled alone spends most of its 11-16 s parsing pybind11
    and instantiating the same templates again: as one unit the fourteen take
    30 s of CPU instead of about 150 s (GCC 12, -O3). The files stay one per
    op; their helpers have op-specific names, so that they can share a unit.
    The includes follow the sorted order, so the bindings still register in
    static-initialization order. Written only when it changes (no rebuild)."""
    bindings = [s for s in sources if s.endswith("_bind.cpp") or os.path.basename(s) == "bindings.cpp"]
    path = os.path.join("build", BINDINGS_TU)
    text = "// generated by setup.py: the pybind11 files as one translation unit\n" + "".join(
        f'#include "{os.path.basename(s)}"\n' for s in bindings)
    if not os.path.exists(path) or open(path).read() != text:
        os.makedirs("build", exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    return [s for s in sources if s not in bindings] + [path]


install_parallel_compile()

sources = bindings_as_one_unit(sorted(glob("csrc/*.cpp")))
include_dirs, library_dirs, libraries, macros = ["csrc"], [], [], []
torch_build = installed_torch() if os.environ.get("FASTVAE_TORCH_OPS", "1") == "1" else None
if torch_build is None:
    sources.remove("csrc/torch_ops.cpp")
    print("fastvae: torch not found at build time: building without csrc/torch_ops.cpp "
          "(eager CPU calls then go through Python; install torch first for the fast path)", file=sys.stderr)
else:
    torch_include, library_dirs, cxx11_abi = torch_build
    # -isystem: searched after every -I, so the bindings keep pip's pybind11
    # over the copy torch bundles (torch_ops.cpp includes no pybind11 header)
    compile_args += [arg for d in torch_include for arg in ("-isystem", d)]
    libraries = ["c10", "torch", "torch_cpu"]
    macros = [("FASTVAE_TORCH_OPS", None), ("_GLIBCXX_USE_CXX11_ABI", str(cxx11_abi))]

ext = Pybind11Extension(
    "fastvae._C",
    sources,
    include_dirs=include_dirs,
    library_dirs=library_dirs,
    runtime_library_dirs=library_dirs,
    libraries=libraries,
    define_macros=macros,
    depends=sorted(glob("csrc/*.h") + glob("csrc/*_bind.cpp") + ["csrc/bindings.cpp"]),
    extra_compile_args=compile_args,
    extra_link_args=link_args,
    cxx_std=17 if torch_build is None else 20,  # torch's headers need C++20
)

setup(
    packages=["fastvae", "fastvae.kernels"],
    package_dir={"fastvae": "fastvae", "fastvae.kernels": "kernels"},
    ext_modules=[ext],
    cmdclass={"build_ext": build_ext},
)

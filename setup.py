"""Build of the cpp backend: csrc/*.cpp and each op folder's fastvae/ops/<op>/*.cpp
-> fastvae._C (pybind11 + OpenMP).

csrc/torch_ops.cpp and the op folders' torch_op.cpp, the eager CPU operators
with C++ autograd (fastvae_cpp::*), link libtorch: it is built against the torch installed in the interpreter
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
    installed, never a second download. None only where torch is not
    installed: a torch that is there but fails to answer stops the build with
    its error, since building on without the operators would quietly slow
    every eager CPU call (pip -q hides a warning)."""
    code = ("import json, torch, torch.utils.cpp_extension as c; "
            "print(json.dumps([c.include_paths(), c.library_paths(), int(torch._C._GLIBCXX_USE_CXX11_ABI)]))")
    try:
        found = subprocess.run([sys.executable, "-E", "-c", code], capture_output=True, text=True, check=True)
    except OSError:
        return None
    except subprocess.CalledProcessError as err:
        if "No module named 'torch'" in err.stderr:
            return None
        raise RuntimeError("fastvae: torch is installed, but asking it for its headers failed; fix that, or build "
                           "without the eager CPU operators with FASTVAE_TORCH_OPS=0:\n" + err.stderr[-3000:]) from err
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
        return 2 if os.path.basename(src) in (TORCH_OPS_TU, BINDINGS_TU) else 0

    def compile_slowest_first(compiler, sources, *args, **kwargs):
        order = sorted(sources, key=cost, reverse=True)
        objects = dict(zip(order, parallel(compiler, order, *args, **kwargs)))
        return [objects[s] for s in sources]

    distutils.ccompiler.CCompiler.compile = compile_slowest_first


BINDINGS_TU = "fastvae_bindings.cpp"
TORCH_OPS_TU = "fastvae_torch_ops.cpp"


def one_unit(name: str, files: list[str]) -> str:
    """build/<name>: a generated translation unit that includes ``files`` in
    order, each by its path from build/. Written only when it changes (no
    rebuild)."""
    path = os.path.join("build", name)
    text = "// generated by setup.py: one translation unit of\n" + "".join(
        f'#include "../{f}"\n' for f in files)
    if not os.path.exists(path) or open(path).read() != text:
        os.makedirs("build", exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    return path


def is_binding(src: str) -> bool:
    return os.path.basename(src) in ("bindings.cpp", "bind.cpp") or src.endswith("_bind.cpp")


def is_torch_op(src: str) -> bool:
    return os.path.basename(src) in ("torch_ops.cpp", "torch_op.cpp")


def as_units(sources, torch_ops: bool):
    """The kernel sources, each compiled alone, then the pybind11 files
    (csrc/bindings.cpp, every *_bind.cpp and each op folder's bind.cpp) as one
    generated unit, and the eager operators (csrc/torch_ops.cpp first, which
    defines the libraries, then each op folder's torch_op.cpp) as another, or
    none without torch. Each pybind11 file compiled alone spends most of its
    11-16 s parsing pybind11 and instantiating the same templates again: as one
    unit the fourteen take 30 s of CPU instead of about 150 s (GCC 12, -O3);
    libtorch's headers likewise. The files stay one per op; their helpers have
    op-specific names (or sit in an op's anonymous namespace), so that they can
    share a unit. The includes follow the sorted order, so the bindings still
    register in static-initialization order."""
    kernels = [s for s in sources if not is_binding(s) and not is_torch_op(s)]
    units = [one_unit(BINDINGS_TU, [s for s in sources if is_binding(s)])]
    if torch_ops:
        ops = sorted((s for s in sources if is_torch_op(s)), key=lambda s: os.path.basename(s) != "torch_ops.cpp")
        units.append(one_unit(TORCH_OPS_TU, ops))
    return kernels + units


install_parallel_compile()

torch_build = installed_torch() if os.environ.get("FASTVAE_TORCH_OPS", "1") == "1" else None
sources = as_units(sorted(glob("csrc/*.cpp")) + sorted(glob("fastvae/ops/*/*.cpp")), torch_ops=torch_build is not None)
# an op folder's files include their own headers by name; other files reach an
# op's header as "<op>/<op>.h"
include_dirs, library_dirs, libraries, macros = ["csrc", "fastvae/ops"], [], [], []
if torch_build is None:
    print("fastvae: torch not found at build time: building without the eager CPU operators (csrc/torch_ops.cpp) "
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
    depends=sorted(glob("csrc/*.h") + glob("fastvae/ops/*/*.h") + [s for s in glob("csrc/*.cpp") + glob(
        "fastvae/ops/*/*.cpp") if is_binding(s) or is_torch_op(s)]),
    extra_compile_args=compile_args,
    extra_link_args=link_args,
    cxx_std=17 if torch_build is None else 20,  # torch's headers need C++20
)

setup(
    packages=["fastvae", "fastvae.kernels", "fastvae.ops",
              *(f"fastvae.ops.{os.path.basename(os.path.dirname(d))}"
                for d in sorted(glob("fastvae/ops/*/__init__.py")))],
    package_dir={"fastvae": "fastvae", "fastvae.kernels": "kernels"},
    ext_modules=[ext],
    cmdclass={"build_ext": build_ext},
)

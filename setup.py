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

The build keeps its objects and the linked module in build/ (ignored by git),
one directory per configuration (reusable_build_ext), so that a second `pip install -e .` with no change to the
sources compiles and links nothing: pip's editable install would otherwise
build in a fresh temporary directory every time. `rm -rf build` forces a
clean build (needed only after a compiler upgrade; see reusable_build_ext).
"""
import hashlib
import json
import os
import subprocess
import sys
import sysconfig
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
    """(include dirs, library dirs, cxx11 ABI flag, version) of the torch that fastvae
    will run with, or None. pip builds in an isolated environment that hides
    the target's site-packages; -E (ignore PYTHONPATH, which sets up that
    isolation) shows them again, so the build links the torch already
    installed, never a second download. None only where torch is not
    installed: a torch that is there but fails to answer stops the build with
    its error, since building on without the operators would quietly slow
    every eager CPU call (pip -q hides a warning)."""
    code = ("import json, torch, torch.utils.cpp_extension as c; "
            "print(json.dumps([c.include_paths(), c.library_paths(), int(torch._C._GLIBCXX_USE_CXX11_ABI), "
            "torch.__version__]))")
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
    original order: the bindings register in static-initialization order.
    An object newer than everything its source may include is kept (stale)."""
    import distutils.ccompiler

    parallel = ParallelCompile("FASTVAE_BUILD_JOBS", default=0, needs_recompile=stale).function()

    def cost(src):
        return 2 if os.path.basename(src) in (TORCH_OPS_TU, BINDINGS_TU) else 0

    def compile_slowest_first(compiler, sources, *args, **kwargs):
        order = sorted(sources, key=cost, reverse=True)
        objects = dict(zip(order, parallel(compiler, order, *args, **kwargs)))
        return [objects[s] for s in sources]

    distutils.ccompiler.CCompiler.compile = compile_slowest_first


BINDINGS_TU = "fastvae_bindings.cpp"
TORCH_OPS_TU = "fastvae_torch_ops.cpp"
HEADERS = sorted(glob("csrc/*.h") + glob("fastvae/ops/*/*.h"))
UNIT_FILES: dict[str, list[str]] = {}  # each generated unit's path: the files it includes


def stale(obj: str, src: str) -> bool:
    """Whether the object of ``src`` from an earlier build must be compiled
    again: it is older than the source, than any header of the repository (a
    header change recompiles every file, which may include it), or, for a
    generated unit, than any file the unit includes. Headers outside the
    repository (torch's, the compiler's) are part of the build directory's
    name (build_key), not checked here."""
    built = os.path.getmtime(obj)
    return any(os.path.getmtime(f) > built for f in (src, *HEADERS, *UNIT_FILES.get(src, ())))


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
    UNIT_FILES[path] = files
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


def build_key(ext, torch_version) -> str:
    """A short hash of everything that makes a build's objects differ besides
    the contents of the repository's files: the list of sources (a file gone
    must not stay linked in), flags, macros, include and library paths,
    Python, torch and pybind11 versions, the compiler named by the
    environment. pybind11's include path is left out: pip's isolated build
    environment puts it in a new temporary directory every time."""
    import pybind11

    pybind11_include = os.path.dirname(pybind11.get_include())
    config = [ext.sources, ext.extra_compile_args, ext.extra_link_args, ext.define_macros, ext.libraries,
              ext.library_dirs, ext.runtime_library_dirs,
              [d for d in ext.include_dirs if not d.startswith(pybind11_include)],
              sys.version, sysconfig.get_config_var("EXT_SUFFIX"), torch_version, pybind11.__version__,
              [os.environ.get(v) for v in ("CC", "CXX", "CFLAGS", "CPPFLAGS", "CXXFLAGS", "LDFLAGS", "LDSHARED")]]
    return hashlib.sha256(json.dumps(config).encode()).hexdigest()[:12]


class reusable_build_ext(build_ext):
    """pybind11's build_ext with its objects in build/temp-<key> and, for an
    in-place or editable build, the linked module in build/lib-<key> (key:
    build_key), both kept between builds. A build with nothing changed then
    finds the module up to date and only copies it into fastvae/; a changed
    kernel recompiles that file (stale) and links again. Another configuration
    (FASTVAE_SANITIZE=1, another torch) builds beside it in its own directory.
    A wheel build (pip install ., no -e) keeps its build_lib, so the module
    reaches the wheel; its objects are reused all the same.

    The eager CPU operators' part of the extension is added when it builds
    (run), not when setup.py starts: asking torch for its headers imports it
    (seconds), and pip runs setup.py three times an install, twice only for
    the package's metadata (which finalizes this command to list the sources)."""

    def run(self):
        torch_build = installed_torch() if os.environ.get("FASTVAE_TORCH_OPS", "1") == "1" else None
        if torch_build is None:
            print("fastvae: torch not found at build time: building without the eager CPU operators "
                  "(csrc/torch_ops.cpp) (eager CPU calls then go through Python; install torch first for the fast "
                  "path)", file=sys.stderr)
        (ext,) = self.extensions
        # in place: finalize_options has recorded the extension's name on it, which stays
        vars(ext).update(vars(extension(torch_build)))
        key = build_key(ext, torch_build and torch_build[3])
        self.build_temp = os.path.join("build", f"temp-{key}")
        if self.inplace:  # also set by an editable install
            self.build_lib = os.path.join("build", f"lib-{key}")
        super().run()


def extension(torch_build) -> Pybind11Extension:
    """fastvae._C, with the eager CPU operators when torch_build (installed_torch's
    answer) names a torch, without them otherwise."""
    sources = as_units(sorted(glob("csrc/*.cpp")) + sorted(glob("fastvae/ops/*/*.cpp")),
                       torch_ops=torch_build is not None)
    # an op folder's files include their own headers by name; other files reach an
    # op's header as "<op>/<op>.h"
    include_dirs, library_dirs, libraries, macros, args = ["csrc", "fastvae/ops"], [], [], [], list(compile_args)
    if torch_build is not None:
        torch_include, library_dirs, cxx11_abi, _ = torch_build
        # -isystem: searched after every -I, so the bindings keep pip's pybind11
        # over the copy torch bundles (torch_ops.cpp includes no pybind11 header)
        args = [*compile_args, *(arg for d in torch_include for arg in ("-isystem", d))]
        libraries = ["c10", "torch", "torch_cpu"]
        macros = [("FASTVAE_TORCH_OPS", None), ("_GLIBCXX_USE_CXX11_ABI", str(cxx11_abi))]
    return Pybind11Extension(
        "fastvae._C",
        sources,
        include_dirs=include_dirs,
        library_dirs=library_dirs,
        runtime_library_dirs=library_dirs,
        libraries=libraries,
        define_macros=macros,
        depends=sorted(HEADERS + [s for s in glob("csrc/*.cpp") + glob("fastvae/ops/*/*.cpp")
                                  if is_binding(s) or is_torch_op(s)]),
        extra_compile_args=args,
        extra_link_args=link_args,
        cxx_std=17 if torch_build is None else 20,  # torch's headers need C++20
    )


install_parallel_compile()

setup(
    packages=["fastvae", "fastvae.kernels", "fastvae.ops",
              *(f"fastvae.ops.{os.path.basename(os.path.dirname(d))}"
                for d in sorted(glob("fastvae/ops/*/__init__.py")))],
    package_dir={"fastvae": "fastvae", "fastvae.kernels": "kernels"},
    # without the eager CPU operators until it builds (reusable_build_ext.run)
    ext_modules=[extension(None)],
    cmdclass={"build_ext": reusable_build_ext},
)

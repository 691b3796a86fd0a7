"""A stand-in for triton, for importing sglang's Python modules on a CPU machine (contract tests only).

sglang 0.5.23 imports triton at the top of ``sglang.srt.utils.common`` and of many kernel
modules; the real package is about 1 GB installed and its kernels never run on CPU. The
contract tests put this folder on ``sys.path`` only when no real triton is importable, and
only in the subprocess that imports sglang. Everything here is inert: ``jit``/``autotune``/
``heuristics`` return the function they decorate, every other attribute is a permissive
placeholder. **Nothing computed by triton is ever checked through this stub.**
"""

import sys
import types

__version__ = "3.0.0"  # below anything sglang gates a kernel on; the stub runs no kernel


class _Anything:
    """Any attribute, call, index or arithmetic gives another placeholder."""

    def __init__(self, name="triton.?"):
        self._name = name

    def __getattr__(self, item):
        if item.startswith("__") and item.endswith("__"):
            raise AttributeError(item)
        return _Anything(f"{self._name}.{item}")

    def __call__(self, *args, **kwargs):
        if len(args) == 1 and not kwargs and callable(args[0]):
            return args[0]  # used as a decorator
        return _Anything(f"{self._name}()")

    def __getitem__(self, item):
        return _Anything(f"{self._name}[]")

    def __mro_entries__(self, bases):
        return (object,)

    def __repr__(self):
        return f"<triton stub {self._name}>"

    def __bool__(self):
        return False

    __add__ = __radd__ = __mul__ = __rmul__ = __sub__ = __rsub__ = __truediv__ = __floordiv__ = __or__ = __ror__ = \
        lambda self, other: _Anything(self._name)


def _decorator(*args, **kwargs):
    if len(args) == 1 and not kwargs and callable(args[0]):
        return args[0]
    return lambda fn: fn


jit = autotune = heuristics = _decorator


class JITFunction:  # isinstance() targets must be classes
    pass


class Config:
    def __init__(self, *args, **kwargs):
        self.kwargs = kwargs


class OutOfResources(Exception):
    pass


def cdiv(a, b):
    return -(-a // b)


def next_power_of_2(n):
    return 1 << max(0, int(n - 1).bit_length())


class _StubModule(types.ModuleType):
    def __getattr__(self, item):
        if item.startswith("__") and item.endswith("__"):
            raise AttributeError(item)
        return _Anything(f"{self.__name__}.{item}")


def _submodule(name, **attrs):
    mod = _StubModule(name)
    mod.__dict__.update(attrs)
    mod.__path__ = []  # a package: "import triton.x.y" finds the children below
    sys.modules[name] = mod
    return mod


def _make_finder(top):
    """A meta-path finder: any ``top.x.y`` module imports, as an inert placeholder module."""

    class _Finder:
        @classmethod
        def find_spec(cls, name, path=None, target=None):
            if not name.startswith(top + "."):
                return None
            import importlib.machinery

            return importlib.machinery.ModuleSpec(name, cls, is_package=True)

        @staticmethod
        def create_module(spec):
            mod = _StubModule(spec.name)
            mod.__path__ = []
            return mod

        @staticmethod
        def exec_module(module):
            pass

    return _Finder


sys.meta_path.append(_make_finder("triton"))
language = _submodule("triton.language", constexpr=_Anything("tl.constexpr"), dtype=_Anything("tl.dtype"))
runtime = _submodule("triton.runtime", driver=_Anything("driver"), Config=Config, autotune=_decorator,
                     heuristics=_decorator, OutOfResources=OutOfResources)
_submodule("triton.runtime.jit", JITFunction=JITFunction, jit=_decorator)
_submodule("triton.runtime.autotuner", Autotuner=type("Autotuner", (), {}), autotune=_decorator)
_submodule("triton.runtime.errors", OutOfResources=OutOfResources)

def __getattr__(item):  # any other top-level name (PEP 562)
    if item.startswith("__") and item.endswith("__"):
        raise AttributeError(item)
    return _Anything(f"triton.{item}")

"""The predictor contract: importing ``predictor.py``, constructing its class, calling it.

Shared by the in-process model and the child process of an isolated one, so that a predictor
behaves, and fails, the same way in both.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import itertools
import logging
import os
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from multiserve.types import (
    ModelLoadFailed,
    Models,
    MultiserveError,
    PayloadRequest,
    PredictionFailed,
    Reply,
)
from multiserve_python.response import to_reply

logger = logging.getLogger("multiserve.python")

PREDICTOR_FILE = "predictor.py"
DEFAULT_CLASSES = ("Predictor", "PythonPredictor")  # ours, then Cortex's name
INIT_PARAMETERS = ("model_dir", "config", "models")
PREDICT_EXTRAS = ("query_params", "headers")

_PREFIX = "_multiserve_predictor_"
_import_lock = threading.Lock()  # sys.path and sys.modules are the process's
_serial = itertools.count(1)
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes(pid: int | str = "self") -> int | None:
    """Resident memory of a process (this one by default), or None if it cannot be read."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


@dataclass(slots=True)
class Predictor:
    """A constructed predictor and how to call it."""

    instance: Any
    class_name: str
    module_name: str
    extras: tuple[str, ...]  # which of query_params / headers predict declares
    batch_extras: tuple[str, ...]  # the same for predict_batch
    batches: bool  # it has predict_batch
    is_async: bool  # predict is a coroutine function

    def arguments(self, request: PayloadRequest) -> tuple[Any, dict[str, Any]]:
        """``predict``'s arguments for a request (MalformedRequest for a body that is not the
        JSON its content type says)."""
        kwargs: dict[str, Any] = {}
        for name in self.extras:
            kwargs[name] = getattr(request, name)
        return request.payload, kwargs

    def predict(self, request: PayloadRequest) -> Reply:
        payload, kwargs = self.arguments(request)
        try:
            result = self.instance.predict(payload, **kwargs)
        except Exception as exc:
            raise _raised("predict", exc) from None
        return to_reply(result)

    async def predict_async(self, request: PayloadRequest) -> Reply:
        payload, kwargs = self.arguments(request)
        try:
            result = await self.instance.predict(payload, **kwargs)
        except Exception as exc:
            raise _raised("predict", exc) from None
        return to_reply(result)

    def predict_batch(self, requests: Sequence[PayloadRequest]) -> list[Reply]:
        payloads = [request.payload for request in requests]
        kwargs = {name: [getattr(r, name) for r in requests] for name in self.batch_extras}
        try:
            results = self.instance.predict_batch(payloads, **kwargs)
        except Exception as exc:
            raise _raised("predict_batch", exc) from None
        try:
            results = list(results)
        except TypeError:
            raise PredictionFailed(
                f"predict_batch returned {type(results).__name__}, not a list of results"
            ) from None
        if len(results) != len(requests):
            raise PredictionFailed(
                f"predict_batch returned {len(results)} results for {len(requests)} payloads"
            )
        return [to_reply(result) for result in results]

    def close(self) -> None:
        close = getattr(self.instance, "close", None)
        try:
            if callable(close):
                close()
        finally:
            self.instance = None
            sys.modules.pop(self.module_name, None)


def load(
    version_dir: Path,
    config: Mapping[str, Any],
    class_name: str | None,
    models: Models | None,
    label: str,
    *,
    isolated: bool = False,
) -> Predictor:
    """Import ``predictor.py`` from ``version_dir`` and construct its class.

    Raises `ModelLoadFailed` with a message for the operator: the module's import failing (a
    missing module named), no such class, parameters it asks for that it cannot have, or the
    exception ``__init__`` raised."""
    module_name = f"{_PREFIX}{_identifier(label)}_{next(_serial)}"
    module = _import(version_dir, module_name)
    try:
        cls = _find_class(module, class_name)
        arguments = _init_arguments(cls, version_dir, config, models, isolated)
        predict = getattr(cls, "predict", None)
        if not callable(predict):
            raise ModelLoadFailed(f"{cls.__name__} has no predict method")
        extras = _extras(predict, "predict")
        batch = getattr(cls, "predict_batch", None)
        batch_extras = _extras(batch, "predict_batch") if callable(batch) else ()
        try:
            instance = cls(**arguments)
        except Exception as exc:
            raise ModelLoadFailed(
                f"{cls.__name__}.__init__ raised {type(exc).__name__}: {exc}"
            ) from exc
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return Predictor(
        instance=instance,
        class_name=cls.__name__,
        module_name=module_name,
        extras=extras,
        batch_extras=batch_extras,
        batches=callable(batch),
        is_async=inspect.iscoroutinefunction(predict),
    )


def _import(version_dir: Path, module_name: str) -> ModuleType:
    path = version_dir / PREDICTOR_FILE
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ModelLoadFailed(f"{PREDICTOR_FILE} cannot be imported")
    module = importlib.util.module_from_spec(spec)
    with _import_lock, _on_path(version_dir):
        # Registered while it runs, as an import would: dataclasses and pickle look it up.
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except ModuleNotFoundError as exc:
            sys.modules.pop(module_name, None)
            missing = exc.name or str(exc)
            raise ModelLoadFailed(
                f"{PREDICTOR_FILE} imports {missing!r}, which is not installed in the server's "
                f"environment (pip install it there): {exc}"
            ) from exc
        except BaseException as exc:
            sys.modules.pop(module_name, None)
            if not isinstance(exc, Exception):
                raise
            raise ModelLoadFailed(
                f"{PREDICTOR_FILE} raised {type(exc).__name__} when imported: {exc}"
            ) from exc
        finally:
            _forget_modules_under(version_dir)
    return module


def _find_class(module: ModuleType, class_name: str | None) -> type:
    names = (class_name,) if class_name else DEFAULT_CLASSES
    for name in names:
        found = getattr(module, name, None)
        if isinstance(found, type):
            return found
    if class_name:
        raise ModelLoadFailed(f"{PREDICTOR_FILE} defines no class {class_name!r}")
    raise ModelLoadFailed(
        f"{PREDICTOR_FILE} defines no class 'Predictor' (or Cortex's 'PythonPredictor'); "
        "set predictor_class in config.toml to name another"
    )


def _init_arguments(
    cls: type,
    version_dir: Path,
    config: Mapping[str, Any],
    models: Models | None,
    isolated: bool,
) -> dict[str, Any]:
    """What ``__init__`` declares, by name: model_dir, config, models."""
    offered: dict[str, Any] = {"model_dir": version_dir, "config": dict(config), "models": models}
    try:
        parameters = list(inspect.signature(cls).parameters.values())
    except (TypeError, ValueError):
        return {}
    arguments: dict[str, Any] = {}
    for parameter in parameters:
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        if parameter.name in offered:
            if parameter.name == "models" and isolated:
                raise ModelLoadFailed(
                    f"{cls.__name__}.__init__ takes 'models', which only in-process predictors "
                    'get: remove isolation = "process" from its config.toml, or the parameter'
                )
            if parameter.name == "models" and models is None:
                raise ModelLoadFailed(
                    f"{cls.__name__}.__init__ takes 'models', but no server runs it"
                )
            if parameter.kind == parameter.POSITIONAL_ONLY:
                raise ModelLoadFailed(
                    f"{cls.__name__}.__init__ must take {parameter.name!r} by name"
                )
            arguments[parameter.name] = offered[parameter.name]
        elif parameter.default is parameter.empty:
            raise ModelLoadFailed(
                f"{cls.__name__}.__init__ takes {parameter.name!r}, which multiserve does not "
                f"provide (it provides {', '.join(INIT_PARAMETERS)}, by name)"
            )
    return arguments


def _extras(method: Any, what: str) -> tuple[str, ...]:
    """Which of query_params / headers ``method`` declares; ModelLoadFailed if it requires
    anything else beside the payload(s)."""
    try:
        parameters = list(inspect.signature(method).parameters.values())[1:]  # self
    except (TypeError, ValueError):
        return ()
    if not parameters or parameters[0].kind in (
        parameters[0].KEYWORD_ONLY,
        parameters[0].VAR_KEYWORD,
    ):
        raise ModelLoadFailed(f"{what} must take the payload as its first parameter")
    extras = []
    for parameter in parameters[1:]:
        if parameter.name in PREDICT_EXTRAS:
            extras.append(parameter.name)
        elif parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        elif parameter.default is parameter.empty:
            raise ModelLoadFailed(
                f"{what} takes {parameter.name!r}; it can take the payload, then "
                f"{' and '.join(PREDICT_EXTRAS)} by name"
            )
    return tuple(extras)


def _raised(what: str, exc: Exception) -> MultiserveError:
    """An exception from the predictor's code, as the request's error (the traceback is
    logged; the client gets the type and message)."""
    if isinstance(exc, MultiserveError):
        return exc
    logger.error("the predictor's %s raised", what, exc_info=exc)
    return PredictionFailed(f"the predictor's {what} raised {type(exc).__name__}: {exc}")


@contextlib.contextmanager
def _on_path(directory: Path) -> Iterator[None]:
    """The version directory first on sys.path while predictor.py is imported, so that it can
    import modules beside it."""
    sys.path.insert(0, str(directory))
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(str(directory))


def _forget_modules_under(directory: Path) -> None:
    """Drop modules imported from the version directory from sys.modules (the predictor keeps
    its references), so that another version's ``helpers.py`` is its own, not this one's."""
    root = os.path.join(str(directory), "")
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if isinstance(path, str) and path.startswith(root) and not name.startswith(_PREFIX):
            del sys.modules[name]


def _identifier(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label)[:60]

"""Which onnxruntime execution providers run the ONNX fragments: asked for by name, never guessed.

Why strict: onnxruntime quietly falls back to the CPU when a GPU provider is
missing or fails to start (it prints an "EP Error" banner on stdout and
retries), and it places nodes a GPU provider cannot run on the CPU.  On a
Jetson that turns a 2 ms model into a 40 ms one with no error.  Here

- every requested provider must be in ``onnxruntime.get_available_providers()``
  (else :class:`ProviderError`, listing the available ones; the CLI exits 2);
- the list is passed to onnxruntime in the order given;
- without ``cpu`` in the list, onnxruntime's session fallback is off and no node
  may land on the CPU (``session.disable_cpu_ep_fallback``); a provider that did
  not start is an error.  ``cuda,cpu`` asks for the CPU as the fallback: nodes
  CUDA cannot run go to the CPU, and a provider that did not start is reported
  on stderr, not hidden;
- TensorRT keeps its built engines in the bundle (``<bundle>/trt_cache/<sha256
  prefix of the fragment>/``), so a second start loads them instead of
  rebuilding (minutes on a Jetson).  The folder is per fragment because
  onnxruntime names engines from the graph's structure, not its weights: two
  experts of one architecture must not share an engine.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Sequence, Union

from .backends import BackendError

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
PROVIDER_CHOICES = tuple(PROVIDERS)
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
TRT_CACHE_DIR = "trt_cache"
ProvidersLike = Union[str, Sequence[str], None]  # "cuda,cpu", ["cuda", "cpu"] or onnxruntime's full names


class ProviderError(BackendError):
    """A requested execution provider cannot be used here; the message lists the available ones."""


def parse_providers(value: ProvidersLike) -> tuple[str, ...] | None:
    """``"tensorrt,cuda,cpu"`` (or a list, short or full names) -> onnxruntime's names in the given order."""
    if value is None:
        return None
    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else [str(v).strip() for v in value]
    if not items or not all(items):
        raise ProviderError(f"no execution provider given; valid: {', '.join(PROVIDER_CHOICES)}")
    full_names = {v: k for k, v in PROVIDERS.items()}
    names = []
    for item in items:
        name = PROVIDERS.get(item.lower()) or (item if item in full_names else None)
        if name is None:
            raise ProviderError(f"unknown execution provider {item!r}; valid: {', '.join(PROVIDER_CHOICES)} "
                                f"(or onnxruntime's names: {', '.join(PROVIDERS.values())})")
        if name in names:
            raise ProviderError(f"execution provider {item!r} given twice in {','.join(items)}")
        names.append(name)
    return tuple(names)


def available_providers() -> list[str]:
    """onnxruntime's providers in this install ([] without onnxruntime)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return []
    return list(ort.get_available_providers())


def check_available(providers: Sequence[str]) -> None:
    """ProviderError naming each requested provider this onnxruntime build lacks, and what it has."""
    available = available_providers()
    missing = [p for p in providers if p not in available]
    if missing:
        hint = (" (install NVIDIA's onnxruntime-gpu build for this device, e.g. JetPack's wheel)"
                if any(p in GPU_PROVIDERS for p in missing) else "")
        raise ProviderError(f"onnxruntime provider{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                            f"{'are' if len(missing) > 1 else 'is'} not available here; available: "
                            f"{', '.join(available) or 'none'}{hint}")


def cpu_allowed(providers: Sequence[str]) -> bool:
    return "CPUExecutionProvider" in providers


def device_of(providers: Sequence[str] | None) -> str:
    """Where the first provider keeps tensors: ``cuda`` for CUDA and TensorRT, else ``cpu`` (for I/O binding)."""
    return "cuda" if providers and providers[0] in GPU_PROVIDERS else "cpu"


def trt_cache_dir(bundle: str | Path, sha256: str) -> Path:
    """The TensorRT engine cache folder of one fragment, inside the bundle."""
    return Path(bundle) / TRT_CACHE_DIR / sha256[:16]


def provider_options(providers: Sequence[str], cache: Path | None) -> list[dict[str, Any]]:
    """Options per provider, in order: TensorRT gets its engine and timing caches in ``cache``."""
    options: list[dict[str, Any]] = []
    for name in providers:
        if name == "TensorrtExecutionProvider" and cache is not None:
            cache.mkdir(parents=True, exist_ok=True)
            options.append({"trt_engine_cache_enable": "True", "trt_engine_cache_path": str(cache),
                            "trt_timing_cache_enable": "True", "trt_timing_cache_path": str(cache)})
        else:
            options.append({})
    return options


def configure_session(options: Any, providers: Sequence[str]) -> dict[str, Any]:
    """Session settings for ``providers``; returns extra ``InferenceSession`` keyword arguments.

    Without the CPU in the list no node may be placed on it and onnxruntime must not retry on the CPU.
    """
    if cpu_allowed(providers):
        return {}
    options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    return {"enable_fallback": 0}


def explain_session_error(exc: BaseException, providers: Sequence[str], fragment_id: str) -> ProviderError | None:
    """A ProviderError when onnxruntime refused the session because of the provider list, else None."""
    text = " ".join(str(exc).split())
    if "fallback to CPU EP has been explicitly disabled" in text:
        short = ",".join(k for p in providers for k, v in PROVIDERS.items() if v == p)  # the user's order
        return ProviderError(f"fragment {fragment_id!r} has nodes {', '.join(providers)} cannot run; add cpu to let "
                             f"onnxruntime run them on the CPU (--provider {short},cpu)")
    gpu = [p for p in providers if p in GPU_PROVIDERS]
    if gpu and any(word in text.lower() for word in ("cuda", "tensorrt", "cudnn", "cublas", "provider")):
        return ProviderError(f"{', '.join(gpu)} failed to start for fragment {fragment_id!r}: {text[:300]}")
    return None  # not about providers (e.g. a damaged file): the loader reports it as such


def check_started(session: Any, providers: Sequence[str], fragment_id: str) -> None:
    """Each requested provider is among the session's; else an error (or, with cpu asked for, a stderr line)."""
    active = list(session.get_providers())
    missing = [p for p in providers if p not in active]
    if not missing:
        return
    message = (f"{', '.join(missing)} did not start for fragment {fragment_id!r}; the session runs on "
               f"{', '.join(active)}")
    if not cpu_allowed(providers):
        raise ProviderError(message)
    print(f"edge-runtime: warning: {message} (the CPU was allowed as fallback)", file=sys.stderr)

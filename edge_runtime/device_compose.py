"""Library -> experts on one device through onnxruntime I/O binding: the features never visit the host.

Why: the plain path (``Runtime`` without ``io_binding``) gets the library's
features back as a numpy array and hands that array to every expert, so on a
GPU each batch's features travel device -> host once and host -> device once
per expert.  Here the library writes its output into an ``OrtValue`` that stays
where its provider computes (``cuda`` for CUDA and TensorRT, ``cpu`` otherwise)
and every expert session reads that same ``OrtValue``; only the image batch goes
up and the (small) logits come down.  On a CPU both paths compute the same
numbers (a test checks they are equal), so the switch can be tried anywhere.
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from .manifest import ManifestError
from .runners import OnnxRunner, Runner


class BoundComposer:
    """Runs the library once and its experts on the library's device-resident output; one binding per session."""

    def __init__(self, library: Runner, experts: Sequence[Runner], device_id: int = 0) -> None:
        runners = (library, *experts)
        if not all(isinstance(r, OnnxRunner) for r in runners):
            raise ValueError("io_binding needs the onnxruntime backend (ONNX fragments); TFLite interpreters have "
                             "no device-resident tensors to bind")
        for expert in experts:
            if not expert.input.same_encoding(library.output):
                raise ManifestError(f"io_binding: expert {expert.fragment.id!r} does not take the library's output "
                                    "as it is (its input encoding differs), so it cannot read it on the device")
        self.library: OnnxRunner = library  # type: ignore[assignment]
        self.experts: tuple[OnnxRunner, ...] = tuple(experts)  # type: ignore[assignment]
        self.device, self.device_id = library.device, device_id
        self._lib_binding = library.session.io_binding()
        self._bindings = [e.session.io_binding() for e in self.experts]

    def __call__(self, encoded: np.ndarray, timings: dict[str, float] | None = None) -> list[np.ndarray]:
        """Each expert's raw output (host numpy), in expert order, for one batch of library input."""
        lib, binding = self.library, self._lib_binding
        start = time.perf_counter()
        binding.bind_cpu_input(lib.input.name, np.ascontiguousarray(encoded))
        # Outputs are bound by device on every call: once run, a binding holds the value it allocated and its
        # shape, so reusing it for another batch size fails.
        binding.bind_output(lib.output.name, self.device, self.device_id)
        lib.session.run_with_iobinding(binding)
        features = binding.get_outputs()[0]  # an OrtValue on self.device: not copied to the host
        if timings is not None:
            timings[lib.fragment.id] = timings.get(lib.fragment.id, 0.0) + time.perf_counter() - start
        outputs = []
        for expert, eb in zip(self.experts, self._bindings):
            start = time.perf_counter()
            eb.bind_ortvalue_input(expert.input.name, features)
            eb.bind_output(expert.output.name, "cpu")  # logits are a few floats per image: the host needs them
            expert.session.run_with_iobinding(eb)
            outputs.append(eb.copy_outputs_to_cpu()[0])
            if timings is not None:
                timings[expert.fragment.id] = timings.get(expert.fragment.id, 0.0) + time.perf_counter() - start
        return outputs

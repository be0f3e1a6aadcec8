"""ONNX Runtime (``pip install "anymc3d[cpu]"``): the frozen pass exported to ONNX once (export cache),
run by the CPU execution provider with all graph optimisations, ``threads`` intra-op threads."""
from __future__ import annotations

import numpy as np
import torch

from .base import Engine, EngineUnavailable, FrozenPass, Runner, export_onnx


class OnnxRuntimeEngine(Engine):
    name = "onnxruntime"
    package = "onnxruntime"
    modules = ("onnxruntime", "onnx")

    def version(self) -> str:
        import onnxruntime

        return onnxruntime.__version__

    def build(self, frozen: FrozenPass, example: torch.Tensor, cache, threads: int, material: dict) -> Runner:
        if not self.available():
            raise EngineUnavailable("onnxruntime (and onnx, for the export) are not installed")
        import onnxruntime as ort

        folder = cache.entry({**material, "onnxruntime": self.version()}, self.name,
                             lambda tmp: export_onnx(frozen, example, tmp / "model.onnx"))
        so = ort.SessionOptions()
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(str(folder / "model.onnx"), so, providers=["CPUExecutionProvider"])

        def run(x: torch.Tensor) -> torch.Tensor:
            arr = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
            return torch.from_numpy(sess.run(None, {"slices": arr})[0])

        return Runner(self.name, run, f"onnxruntime {self.version()}, fp32, {threads} thread(s)",
                      str(folder / "model.onnx"))

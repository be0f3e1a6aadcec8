"""OpenVINO (``pip install "anymc3d[cpu]"``): the frozen pass exported to ONNX, converted to OpenVINO IR
once (export cache, fp32 weights), compiled for the CPU with fp32 inference precision (the CPU's bf16
hint changes embeddings by ~1e-2: more than the tolerance), one stream, ``threads`` threads."""
from __future__ import annotations

import numpy as np
import torch

from .base import Engine, EngineUnavailable, FrozenPass, Runner, export_onnx


def _convert(frozen: FrozenPass, example: torch.Tensor, tmp) -> None:
    import openvino as ov

    export_onnx(frozen, example, tmp / "graph.onnx")
    ov.save_model(ov.Core().read_model(str(tmp / "graph.onnx")), str(tmp / "model.xml"), compress_to_fp16=False)
    (tmp / "graph.onnx").unlink()


class OpenVinoEngine(Engine):
    name = "openvino"
    package = "openvino"
    modules = ("openvino", "onnx")

    def version(self) -> str:
        import openvino as ov

        return ov.get_version()

    def build(self, frozen: FrozenPass, example: torch.Tensor, cache, threads: int, material: dict,
              precision: str = "f32") -> Runner:
        if not self.available():
            raise EngineUnavailable("openvino (and onnx, for the export) are not installed")
        import openvino as ov

        folder = cache.entry({**material, "openvino": self.version()}, self.name,
                             lambda tmp: _convert(frozen, example, tmp))
        core = ov.Core()
        compiled = core.compile_model(core.read_model(str(folder / "model.xml")), "CPU",
                                      {"INFERENCE_NUM_THREADS": int(threads), "NUM_STREAMS": 1,
                                       "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": precision})
        request = compiled.create_infer_request()

        def run(x: torch.Tensor) -> torch.Tensor:
            arr = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
            request.infer({0: arr})
            return torch.from_numpy(np.array(request.get_output_tensor(0).data, copy=True))

        return Runner(self.name, run, f"openvino {self.version()}, {precision}, {threads} thread(s)",
                      str(folder / "model.xml"))

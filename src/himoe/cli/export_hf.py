"""`himoe export-hf`: a Hugging Face transformers model directory from a saved model."""

from __future__ import annotations

from pathlib import Path

from himoe.cli.options import add_model_dir


def cmd_export_hf(args) -> int:
    from himoe.hf.export import WEIGHTS_FILE, export_hf

    s = export_hf(Path(args.model_dir), Path(args.out), args.force)
    print(f"exported {args.model_dir} (step {s['step']}, {s['router']} router, "
          f"{s['params']:,} parameters) to {s['out']}: {WEIGHTS_FILE} {s['bytes']:,} bytes, "
          f"{s['seconds']:.1f}s; load with AutoModelForCausalLM.from_pretrained("
          f"{s['out']!r}, trust_remote_code=True)")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("export-hf", help="write a Hugging Face transformers model directory "
                                         "(safetensors, remote code, tokenizer)")
    add_model_dir(p)
    p.add_argument("--out", required=True, help="the directory to write (HFDIR)")
    p.add_argument("--force", action="store_true",
                   help="replace --out even if it is a non-empty directory that is not an "
                        "earlier export")
    p.set_defaults(func=cmd_export_hf)

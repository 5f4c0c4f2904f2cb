from pdistill_jax.log import logger

from . import add_model_argument

FORMATS = ("peft", "merged")
_log = logger("export")


def add_arguments(p):
    add_model_argument(p, "the base model the adapter names, its base_model_name_or_path")
    p.add_argument("--adapter", required=True, help="a training RUN folder or a PEFT adapter folder")
    p.add_argument("--out", required=True, help="folder to write (replaced only once complete)")
    p.add_argument("--format", choices=FORMATS, default="peft",
                   help="peft: LoRA adapter folder (PeftModel.from_pretrained, vLLM up to rank 512); "
                        "merged: a full Hugging Face model with the adapter folded in")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="weight dtype of a merged export (the merge itself is done in float32)")
    p.add_argument("--max-shard-size", default="5GB",
                   help="merged export: split weights into shards of at most this size")


def main(args):
    from pdistill_jax.weights.merged import export_peft, save_merged
    from pdistill_jax.train.run_folder import training_system_message

    if args.format == "peft":
        out = export_peft(args.out, args.model, args.adapter)
    else:
        out = save_merged(args.out, args.model, args.adapter, dtype=args.dtype,
                          max_shard_size=args.max_shard_size)
    _log.info(f"wrote {args.format} export to {out}")
    if (system := training_system_message(args.adapter)) is not None:
        _log.info(f"note: the adapter was trained with the system message {system!r}; ask it "
                  "under the same one (it is not part of the exported files)")
    print(out)

"""How much of the SAM/ASAM perturbation ε survives fp16/bf16 weights and autocast.

    python benchmarks/mixed_precision.py --init --data-bin data-bin/iwslt14.tokenized.de-en
    python benchmarks/mixed_precision.py --checkpoint ckpt/checkpoint_last.pt --data-bin DATA --batches 3

For SAM (ρ 0.1) and ASAM (ρ 0.2, η 0.01) × weights fp32/fp16/bf16 × rounding (nearest,
stochastic and its controls) and × autocast fp16/bf16: the fraction of ε's non-zero entries
lost, cosine and relative L2 error against ε, and the loss increase obtained.  Every definition
is in fairseq_asam/experiments/precision.py.
"""
import argparse
import json
import sys
import time

from fairseq_asam.experiments import precision


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", metavar="PATH", help="a fairseq translation checkpoint")
    source.add_argument("--init", action="store_true",
                        help="a freshly initialised transformer_iwslt_de_en (the IWSLT'14 recipe's model)")
    parser.add_argument("--data-bin", required=True, help="fairseq binarized data folder")
    parser.add_argument("--subset", default=precision.DEFAULT_SUBSET)
    parser.add_argument("--batches", type=int, default=1, help="fixed batches, each with its own ε")
    parser.add_argument("--max-tokens", type=int, default=precision.RECIPE_MAX_TOKENS)
    parser.add_argument("--sr-seeds", type=int, default=precision.DEFAULT_SR_SEEDS,
                        help="stochastic-rounding draws per row (0: no stochastic rounding)")
    parser.add_argument("--gradient-seeds", type=int, default=precision.DEFAULT_GRADIENT_SEEDS,
                        help="stochastic-rounding draws whose pass-2 gradient is compared too "
                             "(round to nearest always; -1: no gradient comparison)")
    parser.add_argument("--seed", type=int, default=1, help="model init (--init) and batch order")
    parser.add_argument("--precisions", default=",".join(precision.WEIGHT_DTYPES))
    parser.add_argument("--autocast", default=",".join(precision.AUTOCAST_DTYPES),
                        help="autocast modes ('' for none)")
    parser.add_argument("--no-real-forward", action="store_true",
                        help="fp32-arithmetic losses only (skip the fp16/bf16/autocast forward)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads")
    parser.add_argument("--json", metavar="PATH", help="write every row and the summary as JSON")
    parser.add_argument("--quiet", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    start = time.time()
    log = None if args.quiet else (lambda m: print(f"[{time.time() - start:7.1f}s] {m}", file=sys.stderr, flush=True))
    try:
        result = precision.run(
            args.data_bin, checkpoint=args.checkpoint, init=args.init, seed=args.seed, batches=args.batches,
            max_tokens=args.max_tokens, sr_seeds=args.sr_seeds, subset=args.subset,
            real_forward=not args.no_real_forward, gradient_seeds=args.gradient_seeds,
            weight_precisions=[p for p in args.precisions.split(",") if p],
            autocast_modes=[m for m in args.autocast.split(",") if m], log=log,
        )
    except (precision.PrecisionConfigError, FileNotFoundError) as error:
        print(f"mixed_precision.py: error: {error}", file=sys.stderr)
        return 2
    result["command"] = " ".join(["python", "benchmarks/mixed_precision.py"] + list(argv))
    result["wall_seconds"] = time.time() - start
    print(f"{result['source']}: {result['arch']}, {result['parameters']:,} parameters, criterion "
          f"{result['criterion']}; {len(result['batches'])} batch(es) of "
          f"{', '.join(str(b['ntokens']) for b in result['batches'])} target tokens from {result['subset']}; "
          f"L(w) = {result['batches'][0]['loss_fp32']:.5f} nats/token (first batch)")
    for mode, status in result["batches"][0]["autocast"].items():
        extra = (f", {status['cast_parameters']} of {status['parameters']} parameter tensors cast"
                 if status.get("supported") else "")
        print(f"{mode}: {status['reason']}{extra}")
    print()
    print(precision.format_summary(result["summary"]))
    print()
    print(precision.format_groups(result["rows"]))
    print(f"\nwall time {result['wall_seconds']:.0f} s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())

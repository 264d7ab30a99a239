"""What an update of SAM/ASAM costs next to Adam's, through fairseq's own Trainer.

    python benchmarks/step_cost.py --preset iwslt --json benchmarks/results.json
    python benchmarks/step_cost.py --preset iwslt --device cuda --fp16 --update-freq 2

Prints a table (update time, ratio to Adam, forward/backward/optimizer time, perturbation
overhead, tokens per second, peak memory) and the issue's targets; fairseq_asam/benchmark.py
defines every column.
"""
import argparse
import json
import sys

from fairseq_asam import benchmark


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(benchmark.PRESETS), default="iwslt",
                        help="; ".join(f"{name}: {p.description}" for name, p in benchmark.PRESETS.items()))
    parser.add_argument("--device", choices=benchmark.DEVICES, default="cpu")
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--fp16", dest="precision", action="store_const", const="fp16",
                           help="fairseq's --fp16 (needs --device cuda)")
    precision.add_argument("--bf16", dest="precision", action="store_const", const="bf16",
                           help="bf16 training (common.bf16; needs --device cuda)")
    parser.add_argument("--update-freq", type=int, default=1, help="micro-batches per update")
    parser.add_argument("--warmup", type=int, help="untimed updates first (default: the preset's)")
    parser.add_argument("--timed", type=int, help="timed updates per row (default: the preset's)")
    parser.add_argument("--sam-interval", type=int, default=5, help="K of the `asam --sam-interval K` row")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-memory", action="store_true",
                        help="skip the peak-memory runs (one fresh process per row)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one ASAM update with torch.profiler")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    args = parser.parse_args(argv)
    spec = benchmark.BenchmarkSpec(
        preset=args.preset, device=args.device, precision=args.precision or "fp32",
        update_freq=args.update_freq, warmup=args.warmup, timed=args.timed,
        sam_interval=args.sam_interval, seed=args.seed,
    )
    return spec, args


def main(argv=None) -> int:
    spec, args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        benchmark.check_spec(spec)
    except ValueError as exc:
        print(f"step_cost.py: error: {exc}", file=sys.stderr)
        return 2
    result = benchmark.run_benchmark(spec, measure_memory=not args.no_memory)
    result["command"] = " ".join(["python", "benchmarks/step_cost.py"] + list(sys.argv[1:] if argv is None else argv))
    print(benchmark.format_report(result))
    if args.profile:
        result["profile"] = benchmark.profile_update(spec)
        print()
        print(benchmark.format_profile(result["profile"]))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

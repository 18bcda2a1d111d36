"""``python -m vllm_d2moe.eval.zero_shot OUT_DIR``: write the lm-eval task and its dataset."""

import argparse
from pathlib import Path

from vllm_d2moe.eval.zero_shot.next_lines import TASK_NAME, build_task


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split(":", 1)[1].strip())
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--items", type=int, default=300, help="number of questions (default 300)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--corpus-dir", type=Path, default=None, help="default: $D2MOE_CACHE/corpus")
    args = parser.parse_args(argv)
    task = build_task(args.out_dir, args.items, args.seed, args.corpus_dir)
    print(f"wrote {task}; run lm-eval with --include_path {args.out_dir} --tasks {TASK_NAME}")


if __name__ == "__main__":
    main()

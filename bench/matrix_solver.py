"""How long one matrix swap decision takes.

Builds a swap matrix over 64 models whose sets are deeply nested random
``&``/``|`` expressions with ``+`` references (far too many combinations to
expand), then times ``MatrixPlanner.evict_set`` (what the scheduler calls)
and ``MatrixPlanner.explain`` (the decision record, with its tie-break
witness) over many random (target, running) pairs.  Prints per-solve
percentiles in microseconds.

    python bench/matrix_solver.py                   # 20000 solves, seed 1
    python bench/matrix_solver.py --solves 5000 --seed 7 --max-running 12
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llamaswap.scheduling.matrix import MatrixPlanner, compile_matrix  # noqa: E402
from llamaswap.scheduling.matrix_dsl import AllOf, AnyOf, Ident, Node, SetRef  # noqa: E402


def expression(rng: random.Random, models: list[str], refs: list[str], depth: int) -> str:
    """A random expression ``depth`` levels deep over ``models``."""
    if depth == 0 or rng.random() < 0.15:
        if refs and rng.random() < 0.1:
            return "+" + rng.choice(refs)
        return rng.choice(models)
    operator = rng.choice([" & ", " | ", " | "])
    parts = [expression(rng, models, refs, depth - 1) for _ in range(rng.randint(2, 3))]
    return "(" + operator.join(parts) + ")"


def build_sets(rng: random.Random, models: list[str], count: int, depth: int) -> dict[str, str]:
    """``count`` sets, each over a random slice of the models; later sets may
    reference earlier ones."""
    sets: dict[str, str] = {}
    for index in range(count):
        pool = rng.sample(models, rng.randint(8, 24))
        sets[f"set{index:02d}"] = expression(rng, pool, list(sets), depth)
    return sets


def combinations(node: Node, roots: dict[str, Node], memo: dict[int, int]) -> int:
    """How many combinations a full expansion of ``node`` would list."""
    if id(node) in memo:
        return memo[id(node)]
    match node:
        case Ident():
            total = 1
        case SetRef(name):
            total = combinations(roots[name], roots, memo)
        case AnyOf(alternatives):
            total = sum(combinations(alternative, roots, memo) for alternative in alternatives)
        case AllOf(operands):
            total = 1
            for operand in operands:
                total *= combinations(operand, roots, memo)
    memo[id(node)] = total
    return total


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=64)
    parser.add_argument("--sets", type=int, default=12)
    parser.add_argument("--depth", type=int, default=7)
    parser.add_argument("--solves", type=int, default=20000)
    parser.add_argument("--max-running", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    models = [f"model-{index:02d}" for index in range(args.models)]
    sets = build_sets(rng, models, args.sets, args.depth)
    started = time.perf_counter()
    program = compile_matrix(sets, lambda name: name if name in models else None)
    compile_ms = (time.perf_counter() - started) * 1000
    planner = MatrixPlanner(program, {model: rng.randint(1, 4) for model in rng.sample(models, 16)})
    roots = {mset.name: mset.root for mset in program.sets}
    memo: dict[int, int] = {}
    total = sum(combinations(root, roots, memo) for root in roots.values())
    size = sum(len(dsl) for dsl in sets.values())

    questions = []
    for _ in range(args.solves):
        running = frozenset(rng.sample(models, rng.randint(0, args.max_running)))
        target = rng.choice([model for model in models if model not in running])
        questions.append((target, running))

    for target, running in questions[:200]:  # warm-up
        planner.evict_set(target, running)

    timings: dict[str, list[float]] = {"evict_set": [], "explain": []}
    clock = time.perf_counter_ns
    for target, running in questions:
        begin = clock()
        planner.evict_set(target, running)
        timings["evict_set"].append((clock() - begin) / 1000)
    for target, running in questions:
        begin = clock()
        planner.explain(target, running)
        timings["explain"].append((clock() - begin) / 1000)

    print(f"python {sys.version.split()[0]}, seed {args.seed}")
    print(
        f"matrix: {args.models} models, {len(sets)} sets, depth {args.depth}, "
        f"{size} DSL characters, about 10^{int(math.log10(total))} combinations if expanded; "
        f"compiled in {compile_ms:.1f} ms"
    )
    print(f"{args.solves} solves, running sets of 0-{args.max_running} models")
    for name, samples in timings.items():
        print(
            f"  {name:9s} p50 {percentile(samples, 0.50):8.1f} us   "
            f"p99 {percentile(samples, 0.99):8.1f} us   "
            f"max {max(samples):8.1f} us   mean {statistics.fmean(samples):8.1f} us"
        )


if __name__ == "__main__":
    main()

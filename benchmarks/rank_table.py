"""The ranked detector table of docs/methods-zoo.md from one or more ``normscore-bench`` runs.

    python benchmarks/rank_table.py OUT/results.json [OUT2/results.json ...]

For each run (a track: ID set and model), every detector's mean near-OOD and far-OOD AUROC and
``fpr95`` (ID positive) as ``normscore-bench`` computed them, sorted by the mean of the near and
far AUROC (the higher the better; ties by name). Detectors that failed or are not applicable to
the track's model are listed below the table with their reason. Numbers in percent, 1 decimal.
"""

from __future__ import annotations

import argparse
import json


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100.0 * v:.1f}"


def ranked(results: dict) -> tuple[list[list[str]], list[str]]:
    rows, notes = [], []
    scored = []
    for name, d in results["detectors"].items():
        if d.get("error"):
            notes.append(f"`{name}`: {'not applicable' if d.get('not_applicable') else 'failed'} ({d['error']})")
            continue
        near, far = d["metrics"].get("near", {}), d["metrics"].get("far", {})
        key = (near.get("auroc", 0.0) + far.get("auroc", 0.0)) / 2
        scored.append((-key, name, near, far))
    for i, (neg, name, near, far) in enumerate(sorted(scored), 1):
        metrics = [near.get("auroc"), near.get("fpr95"), far.get("auroc"), far.get("fpr95"), -neg]
        rows.append([str(i), f"`{name}`", *(_pct(v) for v in metrics)])
    return rows, notes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", help="results.json of normscore-bench runs")
    args = ap.parse_args(argv)
    for path in args.results:
        with open(path) as f:
            r = json.load(f)
        model = r["model"]
        print(
            f"**{r['id']['dataset']}**, model `{model['name']}` (weights sha256 {model['weights_sha256'][:12]}), "
            f"ID accuracy {_pct(r['id']['accuracy'])} %; near: {', '.join(o['label'] for o in r['ood'] if o['group'] == 'near')}; "
            f"far: {', '.join(o['label'] for o in r['ood'] if o['group'] == 'far')}\n"
        )
        rows, notes = ranked(r)
        print("| rank | detector | near AUROC | near fpr95 | far AUROC | far fpr95 | mean AUROC |")
        print("|---:|---|---:|---:|---:|---:|---:|")
        for row in rows:
            print("| " + " | ".join(row) + " |")
        if notes:
            print()
            for n in notes:
                print(f"- {n}")
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

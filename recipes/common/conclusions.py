"""What a study shows, in words and tables generated from its ``study.json`` and nothing else.

:func:`conclusions` turns a study result into the summary sentences: per target and budget
BiSSL+FT is *ahead of*, *level with* or *behind* Only-FT, decided on the adjusted p-value of the
paired t-test over replicates (``study.correction``) and stated with the difference, its interval
and Cohen's d_z; per target one sentence on the seed spread (Pitman-Morgan, adjusted). The study
command writes them into ``study.md``; the README and the docs pages carry the same text between
markers, regenerated from the stored results by ``python -m recipes.common.conclusions``::

    <!-- study:vision:begin -->  ...generated...  <!-- study:vision:end -->     (Markdown)
    .. study:vision:begin        ...generated...  .. study:vision:end          (reST)

:func:`check_page` fails a page whose generated block differs from what the stored study gives,
or which states anywhere a verdict ("digits, 5 fine-tuning epochs: BiSSL+FT is ahead of ...")
that the study does not support.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from .stats import adjust_study, replicate_comparison

__all__ = ["STUDIES", "analyse", "check_page", "conclusions", "reanalyse", "render_block",
           "replace_block", "slim", "study_markdown", "study_table", "verdict"]

ROOT = Path(__file__).resolve().parents[2]
#: The stored studies the pages quote (name -> slimmed study.json) and the pages quoting them.
STUDIES = {"vision": ROOT / "docs" / "recipes" / "study" / "vision_embedded.json",
           "gpt": ROOT / "docs" / "recipes" / "study" / "gpt_embedded.json"}
PAGES = {"vision": [ROOT / "README.md", ROOT / "docs" / "recipes" / "vision.rst"],
         "gpt": [ROOT / "README.md", ROOT / "docs" / "recipes" / "nlp.rst"]}
VERDICTS = {"ahead": "ahead of", "level": "level with", "behind": "behind"}
CORRECTIONS = {"holm": "Holm-adjusted", "bh": "BH-adjusted", "none": "unadjusted"}
CLAIM = re.compile(r"(?P<target>[\w-]+),? (?:at )?(?P<epochs>\d+(?:\.\d+)?) fine-tuning epochs?:? "
                   r"BiSSL\+FT is (?P<verdict>ahead of|level with|behind)")


def _p(value: float | None) -> str:
    return "–" if value is None else f"{value:.2g}" if value >= 0.001 else f"{value:.1e}"


def _ratio(value: float | None) -> str:
    return "–" if value is None or value != value else f"{value:.2f}"


def _interval(pair: list[float] | None, scale: float = 100.0, fmt: str = "+.1f") -> str:
    return "–" if pair is None else f"[{scale * pair[0]:{fmt}}, {scale * pair[1]:{fmt}}]"


def verdict(c: dict[str, Any]) -> str:
    """``ahead``, ``level``, ``behind`` (on the adjusted p-value) or ``undefined``."""
    if c["degenerate"] or c.get("p_adjusted") is None:
        return "undefined"
    if not c["significant"]:
        return "level"
    return "ahead" if c["diff"] > 0 else "behind"


def _sentence(target: str, epochs: float, c: dict[str, Any], scale: float) -> str:
    head = f"{target}, {epochs:g} fine-tuning epochs: "
    v = verdict(c)
    if v == "undefined":
        return (head + f"{c['note']} (BiSSL+FT − Only-FT {scale * c['diff']:+.1f} points in "
                "every replicate); no verdict.")
    adj = CORRECTIONS[c["correction"]]
    dz_ci = _interval(c["d_z_ci"], 1.0, ".2f")
    stats = (f"95% CI {_interval(c['ci'])}, d_z = {c['d_z']:.2f} {dz_ci}, "
             f"{adj} p = {_p(c['p_adjusted'])}")
    if v == "level":
        return head + f"BiSSL+FT is level with Only-FT ({scale * c['diff']:+.1f} points, {stats})."
    return (head + f"BiSSL+FT is {VERDICTS[v]} Only-FT by {abs(scale * c['diff']):.1f} points "
            f"({stats}).")


def _spread_sentence(target: str, rows: list[dict[str, Any]]) -> str:
    smaller = [f"{r['epochs']:g}" for r in rows if r["comparison"]["spread_significant"]
               and (r["comparison"]["spread_ratio"] or 0.0) < 1]
    larger = [f"{r['epochs']:g}" for r in rows if r["comparison"]["spread_significant"]
              and (r["comparison"]["spread_ratio"] or 0.0) > 1]
    ratios = ", ".join(_ratio(r["comparison"]["spread_ratio"]) for r in rows)
    budgets = ", ".join(f"{r['epochs']:g}" for r in rows)
    found = []
    if smaller:
        found.append(f"significantly smaller at {', '.join(smaller)} epochs")
    if larger:
        found.append(f"significantly larger at {', '.join(larger)} epochs")
    rest = "; ".join(found) + "; no significant difference elsewhere" if found else \
        "no significant difference at any budget"
    return (f"{target}, seed spread: BiSSL+FT's over Only-FT's is {ratios} at {budgets} epochs "
            f"(Pitman–Morgan over the seeds within replicates, adjusted): {rest}.")


def conclusions(study: dict[str, Any], scale: float = 100.0) -> list[str]:
    """The summary sentences of a study (see the module docstring), the overview first."""
    counts = {"ahead": 0, "level": 0, "behind": 0, "undefined": 0}
    lines = []
    for target, entry in study["targets"].items():
        for row in entry["rows"]:
            counts[verdict(row["comparison"])] += 1
            lines.append(_sentence(target, row["epochs"], row["comparison"], scale))
        lines.append(_spread_sentence(target, entry["rows"]))
    cells = sum(counts.values())
    overview = (f"Over {cells} cells ({len(study['targets'])} target(s) × {len(study['epochs'])} "
                f"budgets; {study['replicates']} replicates × {len(study['seeds'])} fine-tuning "
                f"seeds each; {CORRECTIONS[study['correction']]} at α = {study['alpha']:g}) "
                f"BiSSL+FT is ahead in {counts['ahead']}, level in {counts['level']} and behind "
                f"in {counts['behind']}")
    overview += f"; {counts['undefined']} have no variance." if counts["undefined"] else "."
    return [overview, *lines]


def study_table(rows: list[dict[str, Any]], correction: str = "holm", alpha: float = 0.05,
                scale: float = 100.0) -> str:
    """A Markdown table laid out as Table F.5 (a column per budget): mean ± std over the replicate
    means per method (bold: ahead on the adjusted p-value), the difference with its t and
    hierarchical-bootstrap intervals, d_z, the adjusted p-values and the seed-spread ratio."""
    adj = CORRECTIONS[correction]

    def cell(c: dict[str, Any], method: str, sign: int) -> str:
        text = f"{scale * c[f'mean_{method}']:.1f} ± {scale * c[f'between_std_{method}']:.1f}"
        return f"**{text}**" if c["significant"] and sign * c["diff"] > 0 else text

    comps = [r["comparison"] for r in rows]
    lines = [["FT epochs", *[f"{r['epochs']:g}" for r in rows]],
             ["BiSSL+FT", *[cell(c, "bissl_ft", 1) for c in comps]],
             ["Only-FT", *[cell(c, "only_ft", -1) for c in comps]],
             ["diff [95% CI]", *[c["note"] if c["degenerate"] else
                                 f"{scale * c['diff']:+.1f} {_interval(c['ci'])}" for c in comps]],
             ["hier. bootstrap CI", *[_interval(c["bootstrap_ci"]) for c in comps]],
             ["d_z [95% CI]", *["–" if c["d_z"] is None else
                                f"{c['d_z']:+.2f} {_interval(c['d_z_ci'], 1.0, '+.2f')}"
                                for c in comps]],
             [f"p t ({adj})", *[_p(c["p_adjusted"]) for c in comps]],
             [f"p Wilcoxon ({adj})", *[_p(c.get("wilcoxon_p_adjusted")) for c in comps]],
             [f"seed spread ratio (p, {adj})", *[
                 f"{_ratio(c['spread_ratio'])} ({_p(c['spread_p_adjusted'])})" for c in comps]]]
    out = ["| " + " | ".join(line) + " |" for line in lines]
    out.insert(1, "|" + "---|" * len(lines[0]))
    return "\n".join(out)


def _caption(study: dict[str, Any], target: str) -> str:
    entry = study["targets"][target]
    return (f"{target}: test {entry['metric']} ×100, mean ± std over {study['replicates']} "
            f"replicate means ({len(study['seeds'])} fine-tuning seeds each); bold: ahead at "
            f"α = {study['alpha']:g} after {study['correction']} adjustment over all "
            f"{sum(len(e['rows']) for e in study['targets'].values())} cells.")


def study_markdown(study: dict[str, Any]) -> str:
    """``study.md``: the sentences, then a captioned table per target."""
    parts = ["\n".join(f"- {s}" for s in conclusions(study))]
    for target in study["targets"]:
        table = study_table(study["targets"][target]["rows"], study["correction"], study["alpha"])
        parts.append(f"{_caption(study, target)}\n\n{table}")
    return "\n\n".join(parts)


def render_block(study: dict[str, Any], fmt: str) -> str:
    """The generated text of a page: Markdown (``md``) or reST (``rst``)."""
    if fmt == "md":
        return study_markdown(study)
    parts = ["\n".join(f"* {s}".replace("*", r"\*").replace(r"\* ", "* ", 1)
                       for s in conclusions(study))]
    for target in study["targets"]:
        table = study_table(study["targets"][target]["rows"], study["correction"],
                            study["alpha"]).replace("**", "")
        parts.append(_caption(study, target).replace("bold: ahead at", "verdicts at")
                     + "\n\n.. code-block:: text\n\n"
                     + "\n".join("   " + line for line in table.splitlines()))
    return "\n\n".join(parts)


def _markers(name: str, fmt: str) -> tuple[str, str]:
    if fmt == "md":
        return f"<!-- study:{name}:begin -->", f"<!-- study:{name}:end -->"
    return f".. study:{name}:begin", f".. study:{name}:end"


def replace_block(text: str, name: str, fmt: str, block: str) -> str:
    """``text`` with the generated block ``name`` replaced by ``block``."""
    begin, end = _markers(name, fmt)
    i, j = text.index(begin) + len(begin), text.index(end)
    return text[:i] + "\n\n" + block + "\n\n" + text[j:]


def check_page(text: str, studies: dict[str, dict[str, Any]], fmt: str) -> list[str]:
    """What a page states that its stored studies do not support: a generated block that differs
    from the regenerated one, and any verdict sentence (anywhere) that the study contradicts."""
    errors = []
    verdicts = {}
    for name, study in studies.items():
        begin, end = _markers(name, fmt)
        if begin in text:
            if replace_block(text, name, fmt, render_block(study, fmt)) != text:
                errors.append(f"the generated study:{name} block differs from the stored study")
        for target, entry in study["targets"].items():
            for row in entry["rows"]:
                verdicts[(target, float(row["epochs"]))] = verdict(row["comparison"])
    plain = re.sub(r"\s+", " ", text.replace("\\", ""))
    for m in CLAIM.finditer(plain):
        key = (m["target"], float(m["epochs"]))
        said = {v: k for k, v in VERDICTS.items()}[m["verdict"]]
        if key not in verdicts:
            errors.append(f"{m.group(0)!r}: no such cell in the stored studies")
        elif verdicts[key] != said:
            errors.append(f"{m.group(0)!r}: the stored study says {verdicts[key]}")
    return errors


def slim(study: dict[str, Any]) -> dict[str, Any]:
    """A study result without the per-cell run records (what the docs store)."""
    out = dict(study)
    out["targets"] = {t: {**e, "rows": [{k: v for k, v in r.items() if k != "cells"}
                                        for r in e["rows"]]} for t, e in study["targets"].items()}
    return out


def analyse(targets: dict[str, Any], *, alpha: float, correction: str, wilcoxon: bool,
            bootstrap: int) -> None:
    """Fill in a study's statistics from its scores, in place: each row's replicate-level
    :func:`~recipes.common.stats.replicate_comparison` of ``row["Only-FT"]`` and
    ``row["BiSSL+FT"]`` (replicates × seeds), the adjustment over every cell
    (:func:`~recipes.common.stats.adjust_study`) and each target's ``table``."""
    for entry in targets.values():
        for row in entry["rows"]:
            row["comparison"] = replicate_comparison(row["Only-FT"], row["BiSSL+FT"], alpha=alpha,
                                                     wilcoxon=wilcoxon, bootstrap=bootstrap)
    adjust_study(targets, correction, alpha)
    for entry in targets.values():
        entry["table"] = study_table(entry["rows"], correction, alpha)


def reanalyse(study: dict[str, Any]) -> dict[str, Any]:
    """``study`` with its statistics recomputed from its stored scores by :func:`analyse` (the
    scores, cells and times unchanged), so a stored study states what the current analysis says
    of its runs."""
    settings = study["config"]["study"]
    targets = {name: {**entry, "rows": [dict(row) for row in entry["rows"]]}
               for name, entry in study["targets"].items()}
    analyse(targets, alpha=study["alpha"], correction=study["correction"],
            wilcoxon=settings["wilcoxon"], bootstrap=settings["bootstrap"])
    return {**study, "targets": targets}


def update_pages() -> None:
    """Rewrite every page's generated blocks from the stored studies."""
    for name, path in STUDIES.items():
        if not path.exists():
            continue
        study = json.loads(path.read_text())
        for page in PAGES[name]:
            fmt = "md" if page.suffix == ".md" else "rst"
            text = page.read_text()
            if _markers(name, fmt)[0] in text:
                page.write_text(replace_block(text, name, fmt, render_block(study, fmt)))


if __name__ == "__main__":  # python -m recipes.common.conclusions [NAME STUDY_JSON]
    if len(sys.argv) == 3:
        STUDIES[sys.argv[1]].parent.mkdir(parents=True, exist_ok=True)
        STUDIES[sys.argv[1]].write_text(json.dumps(
            slim(reanalyse(json.loads(Path(sys.argv[2]).read_text()))), indent=1) + "\n")
    update_pages()

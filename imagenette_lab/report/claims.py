"""``docs/results/CLAIMS.md``: every finding of the report (Sections II-IV, Table 1, Figure 1), the report's
number, ours at each scale whose sweeps are given (mean ± std over seeds, n) and a verdict with its reason
and a link to the page. Rendered from the runs, never typed: ``python -m imagenette_lab.report SWEEPS
--claims`` (``make report``).

Verdicts, judged on the **last** epoch's validation accuracy (the best epoch is chosen on the same validation
set), Welch's t-test over seeds, Benjamini-Hochberg adjusted when a claim makes several comparisons:

* *holds* / *does not hold*: the seeds tell the arms apart (adjusted p < 0.05) in the report's direction /
  against it; for "no difference" claims, *holds* when the 95 % CI of the difference lies within
  ±``EQUIV_PP`` and *does not hold* when the difference is significant;
* *not resolved at this scale*: no significant difference, fewer than 2 seeds per arm, or the scale's best
  arm below ``REGIME_ACC`` (the report's accuracy claims live at 80-90 %);
* *not yet run*: no sweep of the experiment at this scale; *not tested here*: no experiment can test it.

Hand-written: the verdict rules are this project's reading of each claim, stated in the rendered file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from . import judges as J
from .build import ExperimentReport
from .catalogue import no_cpu_form
from .verdicts import ABS_PP, EQUIV_PP, FAIL_ACC, NOT_RUN, NOT_TESTED, REGIME_ACC, Finding

CLAIMS_FILE = "CLAIMS.md"  # written to the results folder, beside the <scale>/ folders of pages
SCALE_ORDER = ("full", "cpu", "quick")  # columns: the report's scale first




@dataclass(frozen=True)
class Claim:
    section: str
    text: str  # what the report says (quoted or closely paraphrased)
    report: str  # the report's number(s)
    experiment: str | None  # the page that tests it (None: not tested here)
    judge: J.Judge | None = None
    untested: str = ""  # why no experiment tests it


CLAIMS: tuple[Claim, ...] = (
    Claim("II", "ResNet models delivered a higher accuracy than GoogLeNet.", "—", "architectures",
          J.resnets_beat_googlenet),
    Claim("II", "Merging two passes doubles the computation power and space required for each block.", "2×",
          "architectures", J.hybrid_doubles_cost),
    Claim("II, IV.3", "Dropout drastically increases the training time.", "—", "dropout", J.dropout_slower),
    Claim("II, IV.3", "Dropout in all bottlenecks causes the network (with BatchNorm) to fail to learn.", "—",
          "dropout", J.fail_to_learn(("batch",))),
    Claim("II, IV.5", "Mish improved training efficiency: it reaches 80 % sooner than ReLU6.", "—", "activation",
          J.mish_sooner),
    Claim("II, IV.4", "A learning-rate schedule greatly reduced the epochs needed to reach 80 %.", "—",
          "lr_schedule", J.schedule_sooner),
    Claim("III", "The dataset has 9,469 training and 3,925 validation images.", "9,469 / 3,925", "any", J.counts),
    Claim("III, IV.2", "About 5 % of the images are incorrectly labelled.", "~5 %", None,
          untested="the label_noise sweep adds noise on purpose (the CSV's noisy_labels_N); nothing here measures "
          "ImageNette's own label errors, and the report's ~5 % reads the noisy_labels_5 column as one"),
    Claim("III", "Resize 280 performed best amongst sizes between 150 and 450.", "280 best", "resize", J.resize_280),
    Claim("III", "RandomCrop, RandomHorizontalFlip and RandomErasing help the model generalise.", "—", None,
          untested="no augmentation ablation in this project"),
    Claim("III", "Different mean/std values were tried to find an optimal normalization (it matters).", "—",
          "normalize", J.normalization_matters),
    Claim("III", "Adam (lr 0.00024, weight decay 0.00001) outperforms SGD (He et al.'s recipe).", "—", "optimizer",
          J.adam_beats_sgd),
    Claim("III", "Adam lets the model converge faster initially than SGD.", "—", "optimizer", J.adam_faster_start),
    Claim("III", "Time per epoch is inversely proportional to the batch size (32-128).", "—", "batch_size",
          J.time_inverse_batch),
    Claim("III", "Larger batches make the model overfit earlier.", "—", "batch_size", J.larger_overfit_earlier),
    Claim("IV.1, Table 1", "The modified MobileNetV2 (hybrid) outperforms ResNet50.", "89 % vs 87 %", "table1",
          J.hybrid_beats_resnet50),
    Claim("Table 1", "Overall accuracy: hybrid 89 %, ResNet50 87 %.", "89 % / 87 %", "table1", J.table1_numbers),
    Claim("IV.1, Table 1", "The hybrid is better in all classes but two (English springer, French horn).",
          "8 of 10", "table1", J.per_class),
    Claim("IV.1", "No pre-trained models were used, so the outcome is unbiased.", "—", None,
          untested="a statement of method, not a finding; every model here is trained from scratch too"),
    Claim("IV.2", "Insufficient dataset size limits the accuracy (ResNet50 87 % here, > 95 % on ImageNet).", "87 %",
          "dataset_size", J.size_limits),
    Claim("IV.2", "ResNet50 can exceed 95 % on ImageNet (Meta AI's leaderboard).", "> 95 %", None,
          untested="needs ImageNet; the cited leaderboard reports top-5 accuracy"),
    Claim("IV.2", "~5 % noisy labels are a major factor in the lower accuracy.", "~5 %", "label_noise", J.noise_hurts),
    Claim("IV.3", "Dropout does not improve the model: BatchNorm already regularizes.", "—", "dropout",
          J.dropout_no_gain),
    Claim("IV.3, Figure 1", "Dropout without BatchNorm fails to learn.", "Figure 1", "dropout",
          J.fail_to_learn(("none",))),
    Claim("IV.4", "ResNet50 at a constant lr 0.001 barely reached 80 %; with CosineAnnealingLR 87 %.", "~80 % vs 87 %",
          "lr_schedule", J.cosine_beats_constant),
    Claim("IV.5", "ReLU6 reached 85 %; Mish gave no improvement in accuracy.", "85 %, same", "activation",
          J.mish_same_accuracy),
    Claim("IV.5", "BlurPool decreased the model's accuracy.", "—", "blurpool", J.blurpool_lowers),
)


# ------------------------------------------------------------------------------------------ rendering
def judge_all(reports: Sequence[ExperimentReport]) -> dict[str, dict[int, Finding]]:
    """scale -> claim index -> finding, for every scale among ``reports``."""
    by_scale: dict[str, J.Reports] = {}
    for rep in reports:
        by_scale.setdefault(rep.scale, {})[rep.experiment] = rep
    out: dict[str, dict[int, Finding]] = {}
    for scale, reps in by_scale.items():
        out[scale] = {}
        for i, claim in enumerate(CLAIMS):
            if claim.judge is None:
                out[scale][i] = Finding("—", NOT_TESTED, claim.untested)
            else:
                found = claim.judge(reps)
                if found is None and scale == "cpu" and (why := no_cpu_form(claim.experiment)):
                    found = Finding("—", NOT_TESTED, f"`{claim.experiment}` has no cpu form: {why}")
                todo = (f"`make {claim.experiment} SCALE={scale}`" if claim.experiment != "any"
                        else "no run recorded its image counts")
                out[scale][i] = found or Finding("—", NOT_RUN, todo)
    return out


def _scales(found: dict[str, dict[int, Finding]]) -> list[str]:
    return sorted(found, key=lambda s: (SCALE_ORDER.index(s) if s in SCALE_ORDER else len(SCALE_ORDER), s))


def claims_markdown(reports: Sequence[ExperimentReport], pages: Path | None = None) -> str:
    """The Markdown of CLAIMS.md for ``reports`` (all experiments and scales given); ``pages`` is the folder
    CLAIMS.md is written to, where pages without a sweep here are listed."""
    found = judge_all(reports)
    scales = _scales(found)
    rendered = {(r.scale, r.experiment) for r in reports}
    cols = ["#", "section", "the report says", "report"]
    for scale in scales:
        cols += [f"ours, {scale} (mean ± std, n)", f"verdict, {scale}"]
    cols += [] if scales else ["ours", "verdict"]
    lines = ["| " + " | ".join(cols) + " |", "| ---: | " + " | ".join([":---"] * (len(cols) - 1)) + " |"]
    for i, claim in enumerate(CLAIMS):
        row = [str(i + 1), claim.section, claim.text, claim.report]
        for scale in scales:
            f = found[scale][i]
            link = (f" [page]({scale}/{claim.experiment}.md)" if (scale, claim.experiment) in rendered else "")
            row += [f.ours, f"**{f.verdict}** — {f.reason}{link}"]
        if not scales:
            row += ["—", f"**{NOT_TESTED if claim.judge is None else NOT_RUN}**"]
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in row) + " |")
    out = [
        "# The report's claims, checked",
        "",
        "Rendered by `python -m imagenette_lab.report <sweeps> --claims` (`make report`) from the sweeps it was "
        f"given ({', '.join(scales) or 'none'}); not typed by hand. One row per finding of the report's Sections "
        "II-IV, Table 1 and Figure 1; the report's number where it printed one; ours as the last epoch's "
        "validation accuracy in % (mean ± std over seeds, n) unless the cell says otherwise.",
        "",
        *lines,
        "",
        "**Verdicts.** Welch's t-test over seeds on the last epoch's validation accuracy (the best epoch is "
        "chosen on the validation set itself), Benjamini-Hochberg adjusted when a claim makes several "
        f"comparisons, α = 0.05. *holds* / *does not hold*: significant in / against the report's direction; "
        f"a \"no difference\" claim holds when the 95 % CI lies within ±{EQUIV_PP:g} pp. *not resolved at this "
        f"scale*: not significant, fewer than 2 seeds per arm, or the best arm below {REGIME_ACC:.0%} (the "
        f"report's claims live at 80-90 %). \"Fails to learn\": last-epoch accuracy ≤ {FAIL_ACC:.0%} (twice "
        f"chance). Absolute numbers are compared at the full scale only, within ±{ABS_PP:g} pp. *not yet run*: "
        "no sweep of that experiment at that scale (the command is given). *not tested here*: no experiment "
        "of this project can test it.",
    ]
    if pages is not None and pages.is_dir():
        orphans = sorted(p.relative_to(pages).as_posix() for p in pages.glob("*/*.md")
                         if p.name != "NOTES.md" and (p.parent.name, p.stem) not in rendered)
        if orphans:
            out += ["", "Pages rendered earlier from sweeps not given here (not judged above; rerun their sweeps and "
                    "`make report` to include them): " + ", ".join(f"[{o}]({o})" for o in orphans) + "."]
    return "\n".join(out) + "\n"

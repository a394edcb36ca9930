"""Print the model table of docs/models.md: ``python -m imagenette_lab.models > docs/models.md``.

Builds every registry model at its defaults (plus the lighter hybrid variants) and measures parameters
at 10 classes and MACs for one 224 px image. Takes about a minute on 2 CPU cores.
"""

from __future__ import annotations

from .registry import MODEL_NAMES, count_macs, count_params, create_model, model_spec

IMG_SIZE = 224  # px, the report's crop
NUM_CLASSES = 10  # ImageNette

# Lighter hybrid variants for CPU runs: (flags, description)
HYBRID_VARIANTS: tuple[tuple[dict[str, object], str], ...] = (
    ({"rb_groups": 8}, "ResNet pass's 3x3 in 8 groups"),
    ({"width": 0.5}, "half width (head kept at 1280)"),
    ({"width": 0.5, "rb_groups": 8}, "both"),
)


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _measure(name: str, **flags: object) -> list[str]:
    """Params, GMACs, and GMACs with blurpool (strided convs run at stride 1 before the blur)."""
    model = create_model(name, NUM_CLASSES, **flags)
    blurred = create_model(name, NUM_CLASSES, blurpool=True, **flags)
    return [f"{count_params(model):,}", *(f"{count_macs(m, IMG_SIZE) / 1e9:.2f}" for m in (model, blurred))]


def main() -> None:
    print("## Models\n")
    print(
        "`imagenette_lab.models.create_model(name, num_classes, **flags)`; every model is trained from "
        "scratch. Parameters at 10 classes, multiply-accumulates (conv + linear, counted by "
        "`torch.utils.flop_counter`) for one 224 px image in eval mode, default flags; the last column "
        "with `blurpool=true` (parameter counts do not change).\n"
    )
    print(_row(["name", "what", "built from", "params (10 classes)", "GMACs @ 224 px", "GMACs, blurpool"]))
    print(_row(["---", "---", "---", "---:", "---:", "---:"]))
    for name in MODEL_NAMES:
        spec = model_spec(name)
        print(_row([f"`{name}`", spec.what, spec.built_from, *_measure(name)]))
    aux = _measure("googlenet", aux_logits=True)
    print(
        _row(
            [
                "`googlenet aux_logits=true`",
                "with both auxiliary heads (run in training only)",
                "torchvision",
                *aux,
            ]
        )
    )
    print("\nLighter `hybrid` variants (not in the report), for CPU runs:\n")
    print(_row(["flags", "what", "params (10 classes)", "GMACs @ 224 px", "GMACs, blurpool"]))
    print(_row(["---", "---", "---:", "---:", "---:"]))
    for flags, what in HYBRID_VARIANTS:
        shown = " ".join(f"{k}={v}" for k, v in flags.items())
        print(_row([f"`{shown}`", what, *_measure("hybrid", **flags)]))
    print(
        "\nFlags on every model: `act` (relu, relu6, mish, silu, gelu), `drop_rate`, `block_drop_rate`, "
        "`norm` (batch, none), `blurpool`; `width` on mobilenetv2 and hybrid. See "
        "`imagenette_lab/models/registry.py`."
    )


if __name__ == "__main__":
    main()

"""One figure style for the paper and the report: Okabe-Ito colours, fixed per initialisation.

Every figure is built inside :func:`context` so the rcParams apply to it (and to saving it)
without changing matplotlib's global state for the caller.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.figure import Figure

from fomaml_math.analysis.labels import INIT_LABELS
from fomaml_math.evaluation.rows import METALOOP
from fomaml_math.io import atomic_path

# Okabe & Ito (2008), "Color Universal Design": distinguishable under the common colour-vision deficiencies.
OKABE_ITO: dict[str, str] = {
    "black": "#000000",
    "orange": "#E69F00",
    "sky_blue": "#56B4E9",
    "bluish_green": "#009E73",
    "yellow": "#F0E442",
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "reddish_purple": "#CC79A7",
}

# Fixed per initialisation so a colour means the same thing in every figure; markers and dashes
# keep the lines apart in greyscale print too.
INIT_STYLE: dict[str, dict[str, Any]] = {
    "base": {"color": OKABE_ITO["black"], "marker": "o", "linestyle": "--", "label": INIT_LABELS["base"]},
    "sft": {"color": OKABE_ITO["blue"], "marker": "s", "linestyle": "-", "label": INIT_LABELS["sft"]},
    "fomaml": {"color": OKABE_ITO["vermillion"], "marker": "^", "linestyle": "-", "label": INIT_LABELS["fomaml"]},
    # the secondary row: FOMAML's colour, dashed
    METALOOP: {
        "color": OKABE_ITO["vermillion"],
        "marker": "v",
        "linestyle": "--",
        "label": INIT_LABELS[METALOOP],
    },
}
_EXTRA_COLOURS = (OKABE_ITO["bluish_green"], OKABE_ITO["reddish_purple"], OKABE_ITO["orange"], OKABE_ITO["sky_blue"])

# Diverging ColorBrewer map (colour-blind safe) for signed differences.
DIVERGING_CMAP = "PuOr_r"

SINGLE_COLUMN_IN = 3.3
DOUBLE_COLUMN_IN = 6.9
PNG_DPI = 200

RC_PARAMS: dict[str, Any] = {
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 7,
    "legend.frameon": False,
    "lines.linewidth": 1.2,
    "lines.markersize": 3.5,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.5,
    "pdf.fonttype": 42,  # TrueType in the PDF: editable text, accepted by paper venues
    "ps.fonttype": 42,
    "svg.hashsalt": "fomaml-math",
}


@contextmanager
def context() -> Iterator[None]:
    # Figures are built as matplotlib.figure.Figure (no pyplot), so no backend or global state is involved.
    with matplotlib.rc_context(RC_PARAMS):
        yield


def init_style(init: str, position: int = 0) -> dict[str, Any]:
    """Line style for an initialisation; unknown ones get the remaining Okabe-Ito colours."""
    if init in INIT_STYLE:
        return dict(INIT_STYLE[init])
    colour = _EXTRA_COLOURS[position % len(_EXTRA_COLOURS)]
    return {"color": colour, "marker": "D", "linestyle": ":", "label": init}


def save_figure(fig: Figure, output_dir: str | Path, stem: str) -> list[Path]:
    """Write ``<stem>.pdf`` (paper) and ``<stem>.png`` (report) atomically; returns both paths."""
    output_dir = Path(output_dir)
    paths = []
    for fmt in ("pdf", "png"):
        path = output_dir / f"{stem}.{fmt}"
        # No creation date in the PDF: rerunning on unchanged inputs gives the same bytes.
        metadata = {"CreationDate": None} if fmt == "pdf" else None
        with context(), atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=PNG_DPI, metadata=metadata)
        paths.append(path)
    return paths

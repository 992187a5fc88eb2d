"""Entry point: ``python -m benchmarks run --suite quick|standard|full``, ``python -m
benchmarks report RESULTS.json``, the astrometry evidence (``detect-sweep``,
``astrometry-real``, ``false-alarms``, ``fast-path``; see `benchmarks.astrometry_evidence`),
``thin-frames`` (`benchmarks.thin_frames`), ``lanczos-swarp`` (`benchmarks.lanczos_swarp`),
``mosaic`` (the combine of a mosaic: `benchmarks.mosaic`), ``python -m benchmarks
report-scale`` (the run report's time and size against the number of frames;
`benchmarks.report_scale`), ``python -m benchmarks lightcurve`` (light curves from stores
of 250 and 1000 frames; `benchmarks.lightcurve_bench`), ``python -m benchmarks scale``
(up to 1,000 small frames end to end; `benchmarks.scale`) and ``python -m benchmarks
store-codec`` (the store's codec against others; `benchmarks.store_codec`), run from the
repository root."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from .contenders import ALL_CONTENDERS
from .suites import SUITES

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
# command -> (module of this package with its own ``main(argv)``, what it measures)
OWN_PARSERS = {
    "report-scale": ("report_scale", "the run report's time and size for 100 and 500 frames"),
    "lightcurve": ("lightcurve_bench", "daskstack lightcurve on stores of 250 and 1000 frames"),
    "store-codec": ("store_codec", "the store's codec: write and read time and size per "
                                   "registered frame, against other codecs"),
    "scale": ("scale", "N small frames (0.4 m camera size) end to end: time per frame, "
                       "memory and graph submission against N, up to 1,000 frames"),
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["mosaic"]:
        return _mosaic(argv[1:])
    if argv[:1] and argv[0] in OWN_PARSERS:  # benchmarks that parse their own options
        module = importlib.import_module(f".{OWN_PARSERS[argv[0]][0]}", __package__)
        return module.main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m benchmarks",
                                     description="daskstack benchmarks against the tutorial's "
                                                 "method, SWarp and reproject_and_coadd")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a suite; writes JSON, a markdown table and a plot")
    run.add_argument("--suite", choices=tuple(SUITES), default="quick")
    run.add_argument("--out", type=Path, default=DEFAULT_OUT,
                     help="results directory (default: benchmarks/results, whose JSON and "
                          "markdown are committed; its data/ and runs/ are not)")
    run.add_argument("--real-dir", type=Path, default=None,
                     help="the PDS 110 frames (default: ../shared/data/lco-pds110)")
    run.add_argument("--only", nargs="+", choices=ALL_CONTENDERS, default=None,
                     help="run only these contenders")
    run.add_argument("--n", type=int, nargs="+", default=None,
                     help="synthetic frame counts instead of the suite's")
    run.add_argument("--size", type=int, nargs="+", default=None,
                     help="synthetic frame sizes instead of 4096 (e.g. 512 to try it out)")
    run.add_argument("--repeats", type=int, default=None,
                     help="interleaved repeats of every run (default: the suite's, 3)")
    run.add_argument("--mem-limit-gib", type=float, default=None,
                     help="stop a run whose process tree exceeds this (default: 90%% of the "
                          "memory available at the start)")
    run.add_argument("--timeout", type=float, default=3600.0, help="seconds per step")
    run.add_argument("--skip-astrometry", action="store_true")
    run.add_argument("--skip-real", action="store_true")
    run.add_argument("--profile", action="store_true",
                     help="wrap daskstack steps in py-spy (pip install py-spy)")
    run.add_argument("--keep", action="store_true",
                     help="keep the intermediates (store.zarr, SWarp's resampled frames)")
    run.add_argument("--baseline", metavar="REV", default=None,
                     help="also run daskstack at git revision REV (2 workers), interleaved "
                          "with this one: the before/after of a change, as per-round ratios")
    lanczos = sub.add_parser("lanczos-swarp", help="daskstack's lanczos3 (and bilinear) "
                             "coadds against SWarp's LANCZOS3 on the benchmark frames")
    lanczos.add_argument("--out", type=Path, default=DEFAULT_OUT)
    lanczos.add_argument("--real-dir", type=Path, default=None,
                         help="the PDS 110 frames (default: ../shared/data/lco-pds110)")
    lanczos.add_argument("--n-synthetic", type=int, default=4,
                         help="synthetic frames (0: the real frames only)")
    lanczos.add_argument("--size", type=int, default=4096, help="synthetic frame size")
    rep = sub.add_parser("report", help="rewrite the markdown table and plot from a JSON file")
    rep.add_argument("results", type=Path)
    for name, (_module, text) in OWN_PARSERS.items():
        sub.add_parser(name, help=f"{text} (python -m benchmarks {name} --help)")
    sub.add_parser("mosaic", help="the combine of a 10x10 mosaic of 1024x1024 frames: time "
                   "against frames, memory (python -m benchmarks mosaic --help)")
    # the astrometry evidence (benchmarks/astrometry_evidence.py): one result file each
    evidence = {
        "detect-sweep": "isophote threshold x radius on the real frames; photutils' "
                        "detection against daskstack's",
        "astrometry-real": "solve the 12 real frames from wrong start WCSs; error against "
                           "LCO's solution",
        "false-alarms": "solve the real frames against scrambled, random and other-field "
                        "catalogs",
        "fast-path": "registration fast path against reproject_interp, 4096x4096 with SIP",
        "thin-frames": "synthetic thin frames (4-8 stars among 50 cosmic rays and hot pixels) "
                       "solved with the geometry of the night's solved exposures",
    }
    for name, text in evidence.items():
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("--out", type=Path, default=DEFAULT_OUT)
        cmd.add_argument("--real-dir", type=Path, default=None,
                         help="the PDS 110 frames (default: ../shared/data/lco-pds110)")
        if name == "false-alarms":
            cmd.add_argument("--trials", type=int, default=68, help="trials per catalog kind")
            cmd.add_argument("--workers", type=int, default=1, help="processes for the trials")
        if name == "thin-frames":
            cmd.add_argument("--nights", type=int, default=20, help="synthetic nights")
            cmd.add_argument("--per-night", type=int, default=10,
                             help="trials of each kind (thin, other-field, no-stars) per night")
            cmd.add_argument("--workers", type=int, default=1, help="processes for the trials")
    args = parser.parse_args(argv)

    if args.command in evidence:
        import tempfile

        from . import astrometry_evidence as ev

        real_dir = args.real_dir or ev.DEFAULT_REAL_DIR
        if args.command == "detect-sweep":
            with tempfile.TemporaryDirectory() as tmp:
                ev.detect_sweep(real_dir, args.out, tmp)
        elif args.command == "astrometry-real":
            with tempfile.TemporaryDirectory() as tmp:
                ev.astrometry_real(real_dir, args.out, tmp)
        elif args.command == "false-alarms":
            ev.false_alarms(real_dir, args.out, trials_per_kind=args.trials,
                            workers=args.workers)
        elif args.command == "thin-frames":
            from .thin_frames import thin_frames

            thin_frames(args.out, nights=args.nights, per_night=args.per_night,
                        workers=args.workers)
        else:
            ev.fast_path(args.out)
        return 0

    if args.command == "lanczos-swarp":
        from .lanczos_swarp import lanczos_swarp

        lanczos_swarp(args.out, args.real_dir, n_synthetic=args.n_synthetic, size=args.size,
                      command="python -m benchmarks " + " ".join(argv))
        return 0
    if args.command == "report":
        from .report import write_report

        md, png = write_report(args.results)
        print(md.read_text())
        return 0
    from .runner import run_suite

    run_suite(args.suite, args.out, real_dir=args.real_dir, only=args.only, sizes=args.size,
              repeats=args.repeats, mem_limit_gib=args.mem_limit_gib, timeout=args.timeout,
              skip_astrometry=args.skip_astrometry, skip_real=args.skip_real,
              profile=args.profile, keep=args.keep, ns=args.n, command=argv,
              baseline=args.baseline)
    return 0


def _mosaic(argv) -> int:
    from .mosaic import mosaic_benchmark

    parser = argparse.ArgumentParser(prog="python -m benchmarks mosaic",
                                     description="the combine of synthetic n x n mosaics")
    parser.add_argument("--sides", type=int, nargs="*", default=[2, 3, 4, 10],
                        help="mosaics of side x side frames (combine with per-block frame "
                             "lists)")
    parser.add_argument("--dense-sides", type=int, nargs="*", default=[2, 3, 4],
                        help="also these, every block reading every frame")
    parser.add_argument("--nomatch-sides", type=int, nargs="*", default=[],
                        help="also these with per-block frame lists, sky matching off")
    parser.add_argument("--size", type=int, default=1024, help="frame side (px)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--work", type=Path, default=None,
                        help="where the stores are written (default: a temporary directory)")
    args = parser.parse_args(argv)
    md = mosaic_benchmark(args.out, sides=args.sides, size=args.size,
                          dense_sides=args.dense_sides, work=args.work,
                          nomatch_sides=args.nomatch_sides)
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

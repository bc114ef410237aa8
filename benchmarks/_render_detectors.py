"""Renderer of the detectors' scale benchmark (`benchmarks/results/detectors_scale.json`)."""

from __future__ import annotations

from _tables import num, provenance, table


def render_detectors(load) -> str:
    result = load("detectors_scale")
    sections = result["sections"]
    out = []
    # The speed against pytorch-ood's KNN is `knn_speed.py`'s table (the current search,
    # two bank sizes); this result's older 50,000 x 512 ratio stays in its JSON only.
    bank = sections.get("knn_bank")
    if bank:
        out.append(
            f"**A {bank['n']:,} x {bank['f']:,} KNN bank** ({bank['bank_gib']:.2f} GiB float32) "
            "streamed through `fit` from a generator in batches of 8,192, then "
            f"{bank['q']:,} queries scored (`chunk_size=32768`); transient = peak RSS minus RSS "
            "before scoring.\n"
        )
        transient = bank.get("score_transient_mib")
        out.append(
            table(
                [
                    "RSS before fit",
                    "fit s",
                    "peak RSS during fit",
                    "RSS after fit",
                    "score s",
                    "ms / query",
                    "transient memory scoring",
                ],
                [
                    [
                        f"{bank['rss_before_fit_mib']:,.0f} MiB",
                        num(bank["fit_s"], 1),
                        f"{bank['fit_peak_rss_mib']:,.0f} MiB",
                        f"{bank['rss_after_fit_mib']:,.0f} MiB",
                        num(bank["score_s"], 2),
                        num(bank["score_per_query_ms"], 1),
                        "-" if transient is None else f"{transient:+,.0f} MiB",
                    ]
                ],
                "rrrrrrr",
            )
            + "\n"
        )
    maha = sections.get("mahalanobis")
    if maha:
        out.append(
            f"**Mahalanobis, {maha['c']:,} classes x {maha['f']:,} features**: {maha['n']:,} "
            "examples streamed in batches of 2,048 from a generator.\n"
        )
        out.append(
            table(
                [
                    "fit s",
                    "RSS before",
                    "peak RSS",
                    "all features in memory would be",
                    "fitted state",
                    "score 1,000 s",
                ],
                [
                    [
                        num(maha["fit_s"], 1),
                        f"{maha['rss_before_mib']:,.0f} MiB",
                        f"{maha['peak_rss_mib']:,.0f} MiB",
                        f"{maha['features_in_memory_would_be_mib']:,.0f} MiB",
                        f"{maha['state_mib']:,.1f} MiB",
                        num(maha["score_1000_s"], 2),
                    ]
                ],
                "rrrrrr",
            )
            + "\n"
        )
    out.append(provenance(result))
    return "\n".join(out)


RENDERERS = {"detectors-scale": render_detectors}

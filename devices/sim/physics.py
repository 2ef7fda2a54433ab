"""Physics of the simulated home: sun, clouds, household load, PV microinverters, batteries, plugs and meter.

A ``SimulatedHome`` owns one ``SimClock`` (simulated UTC = start + real elapsed * speedup), a location, a
seed and its modules.  It integrates lazily: every ``telemetry()`` or ``apply()`` first advances the whole
home from its last step to "now" in bounded steps (at most ``max_step_s`` simulated seconds each, but never
more than ``max_steps`` per advance, so a 3600x demo or a long jump stays cheap; advances closer together
than ``min_real_interval_s`` of real time are coalesced).  All powers of one step are computed together at
the step's end instant, so the modules' telemetry at one instant satisfies the sign convention of
``devices.model`` exactly: ``sum(pv) + sum(battery) + grid + sum(plug) = household (unmetered) load
served``.  Randomness (clouds, appliances, fridge cycles, EV sessions, grid noise) comes from
``random.Random`` instances derived from the home's seed and each module's serial, so the same seed and the
same sequence of clock readings give the same series.  Setpoint watchdogs (``revert_after_s``) count real
seconds of the clock's time source, i.e. ``revert_after_s * speedup`` simulated seconds.  Simulation state
is mutable by nature, so modules are plain slotted classes guarded by the home's lock (telemetry may be
read from several threads).
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import ClassVar, Protocol, TypeVar

from devices.model import (
    Capabilities,
    DeviceInfo,
    DeviceKind,
    Identity,
    OperatingState,
    Setpoint,
    Telemetry,
)

__all__ = [
    "ConstantProfile",
    "EvChargerProfile",
    "FridgeProfile",
    "HomeModule",
    "HouseholdLoad",
    "Location",
    "PlugProfile",
    "PoolPumpProfile",
    "PowerBalance",
    "SimBattery",
    "SimClock",
    "SimGridMeter",
    "SimMicroinverter",
    "SimSmartPlug",
    "SimulatedHome",
    "build_demo_home",
    "clear_sky_irradiance_w_m2",
    "solar_elevation_deg",
]

TimeSource = Callable[[], float]

_J2000_MIDNIGHT = 946684800.0  # 2000-01-01T00:00:00Z
_TROPICAL_YEAR_DAYS = 365.2422
_TWO_PI = 2.0 * math.pi


# --------------------------------------------------------------------------------------------------- clock


class SimClock:
    """Simulated UTC time: ``start + (real elapsed) * speedup``, read from an injectable real time source."""

    __slots__ = ("_real0", "_speedup", "_start", "_start_ts", "_time_source")

    def __init__(
        self,
        speedup: float = 1.0,
        start: datetime | None = None,
        time_source: TimeSource = time.time,
    ) -> None:
        if not (math.isfinite(speedup) and speedup > 0):
            raise ValueError("speedup must be a positive number")
        self._speedup = float(speedup)
        self._time_source = time_source
        self._real0 = float(time_source())
        if start is None:
            start = datetime.fromtimestamp(self._real0, UTC)
        elif start.tzinfo is None:  # naive datetimes are taken as UTC
            start = start.replace(tzinfo=UTC)
        self._start = start.astimezone(UTC)
        self._start_ts = self._start.timestamp()

    @property
    def speedup(self) -> float:
        return self._speedup

    @property
    def start(self) -> datetime:
        return self._start

    def real_now(self) -> float:
        """The real time source's current reading, in seconds."""
        return float(self._time_source())

    def real_elapsed(self) -> float:
        """Real seconds since the clock was created."""
        return self.real_now() - self._real0

    def sim_at(self, real_ts: float) -> float:
        """The simulated POSIX time that corresponds to a reading ``real_ts`` of the real time source."""
        return self._start_ts + (real_ts - self._real0) * self._speedup

    def now(self) -> float:
        """Simulated time now, POSIX seconds (UTC)."""
        return self.sim_at(self.real_now())

    def now_datetime(self) -> datetime:
        return datetime.fromtimestamp(self.now(), UTC)


# --------------------------------------------------------------------------------------------------- sun


@dataclass(frozen=True, slots=True)
class Location:
    """Where the home is (degrees, north and east positive); panels face the equator, tilted at |latitude|."""

    latitude_deg: float = 37.4
    longitude_deg: float = -122.1

    def __post_init__(self) -> None:
        if not -90.0 <= self.latitude_deg <= 90.0:
            raise ValueError("latitude_deg must be -90..90")
        if not -180.0 <= self.longitude_deg <= 180.0:
            raise ValueError("longitude_deg must be -180..180")

    @property
    def utc_offset_s(self) -> float:
        """Offset of local mean solar time from UTC (no time zones, no daylight saving)."""
        return self.longitude_deg / 15.0 * 3600.0


def _year_fraction(ts: float) -> float:
    """Fraction of the tropical year since 1 January (good to a day, which is all the sun model needs)."""
    days = (ts - _J2000_MIDNIGHT) / 86400.0
    return (days / _TROPICAL_YEAR_DAYS) % 1.0


def _sun(ts: float, latitude_deg: float, longitude_deg: float) -> tuple[float, float]:
    """``(sin(elevation), cos(incidence on an equator-facing panel tilted at |latitude|))``.

    Declination and equation of time use the usual low-order Fourier approximations in the fractional year.
    """
    g = _TWO_PI * _year_fraction(ts)
    c1, s1 = math.cos(g), math.sin(g)
    c2, s2 = math.cos(2 * g), math.sin(2 * g)
    decl = (
        0.006918
        - 0.399912 * c1
        + 0.070257 * s1
        - 0.006758 * c2
        + 0.000907 * s2
        - 0.002697 * math.cos(3 * g)
        + 0.00148 * math.sin(3 * g)
    )
    eqtime_min = 229.18 * (0.000075 + 0.001868 * c1 - 0.032077 * s1 - 0.014615 * c2 - 0.040849 * s2)
    utc_min = (ts % 86400.0) / 60.0
    solar_min = utc_min + eqtime_min + 4.0 * longitude_deg
    hour_angle = math.radians(solar_min / 4.0 - 180.0)
    lat = math.radians(latitude_deg)
    cos_ha = math.cos(hour_angle)
    cos_decl = math.cos(decl)
    sin_elev = math.sin(lat) * math.sin(decl) + math.cos(lat) * cos_decl * cos_ha
    # Tilt equal to |latitude| towards the equator: the panel normal sits on the celestial equator.
    cos_inc = cos_decl * cos_ha
    return sin_elev, cos_inc


def solar_elevation_deg(ts: float, latitude_deg: float, longitude_deg: float) -> float:
    """Solar elevation above the horizon at POSIX time ``ts``, degrees (negative at night)."""
    sin_elev, _ = _sun(ts, latitude_deg, longitude_deg)
    return math.degrees(math.asin(max(-1.0, min(1.0, sin_elev))))


def clear_sky_irradiance_w_m2(ts: float, latitude_deg: float, longitude_deg: float) -> float:
    """Clear-sky plane-of-array irradiance, W/m² (about 1000 at a summer noon, 0 at night).

    Direct normal irradiance from the air mass (Kasten-Young air mass, Meinel attenuation) projected on the
    panel, plus a diffuse part of 10 % of the direct normal irradiance.
    """
    sin_elev, cos_inc = _sun(ts, latitude_deg, longitude_deg)
    if sin_elev <= 0.0:
        return 0.0
    elev_deg = math.degrees(math.asin(min(1.0, sin_elev)))
    air_mass = 1.0 / (sin_elev + 0.50572 * (elev_deg + 6.07995) ** -1.6364)
    dni = 1353.0 * math.pow(0.7, math.pow(air_mass, 0.678))
    return dni * max(0.0, cos_inc) + 0.1 * dni


def _ambient_c(ts: float, local_hour: float, latitude_deg: float) -> float:
    """Outdoor air temperature: a seasonal swing plus a daily one peaking at 15:00 local time."""
    season = -6.0 * math.cos(_TWO_PI * (_year_fraction(ts) - 0.03))
    if latitude_deg < 0:
        season = -season
    return 14.0 + season + 6.0 * math.cos(_TWO_PI * (local_hour - 15.0) / 24.0)


def _ou_step(x: float, dt: float, tau: float, rng: random.Random) -> float:
    """Exact Ornstein-Uhlenbeck step for a unit-variance process with correlation time ``tau``."""
    a = math.exp(-dt / tau)
    return x * a + math.sqrt(max(0.0, 1.0 - a * a)) * rng.gauss(0.0, 1.0)


class _Clouds:
    """Cloud factor (0.05..1): a daily overcast level, a slow OU modulation and occasional passing clouds."""

    __slots__ = ("_day", "_events", "_next_event", "_offset", "_overcast", "_rng", "_seed", "_x")

    _TAU_S = 1200.0
    _MEAN_GAP_S = 2700.0

    def __init__(self, seed: str, t0: float, utc_offset_s: float) -> None:
        self._seed = seed
        self._rng = random.Random(seed)
        self._offset = utc_offset_s
        self._x = self._rng.gauss(0.0, 1.0)
        self._events: list[tuple[float, float, float]] = []  # (start, duration, depth)
        self._next_event = t0 + self._rng.expovariate(1.0 / self._MEAN_GAP_S)
        self._day = -(2**62)
        self._overcast = 0.0

    def factor(self, t: float, dt: float) -> float:
        rng = self._rng
        if dt > 0.0:
            self._x = _ou_step(self._x, dt, self._TAU_S, rng)
        day = math.floor((t + self._offset) / 86400.0)
        if day != self._day:  # changes at local midnight, when nobody sees it
            self._day = day
            self._overcast = 0.6 * random.Random(f"{self._seed}/day/{day}").random() ** 3
        while self._next_event <= t:
            start = self._next_event
            self._events.append((start, rng.uniform(60.0, 420.0), rng.uniform(0.3, 0.75)))
            self._next_event = start + rng.expovariate(1.0 / self._MEAN_GAP_S)
        f = 1.0 - self._overcast * (0.6 + 0.4 * math.tanh(self._x))
        if self._events:
            kept = []
            for start, duration, depth in self._events:
                u = (t - start) / duration
                if u < 1.0:
                    kept.append((start, duration, depth))
                    f *= 1.0 - depth * math.sin(math.pi * u) ** 2
            self._events = kept
        return max(0.05, f)


# --------------------------------------------------------------------------------------------------- loads


def _bump(hour: float, centre: float, sigma: float) -> float:
    d = (hour - centre + 12.0) % 24.0 - 12.0
    return math.exp(-0.5 * (d / sigma) ** 2)


# name, power W, shortest and longest run in seconds
_APPLIANCES: tuple[tuple[str, float, float, float], ...] = (
    ("kettle", 2000.0, 120.0, 240.0),
    ("microwave", 1100.0, 120.0, 480.0),
    ("toaster", 900.0, 120.0, 240.0),
    ("hair dryer", 1500.0, 300.0, 720.0),
    ("vacuum", 1200.0, 600.0, 1800.0),
    ("washing machine", 500.0, 2700.0, 5400.0),
    ("dishwasher", 1200.0, 3600.0, 7200.0),
    ("oven", 2200.0, 1800.0, 3600.0),
    ("television", 120.0, 3600.0, 10800.0),
    ("laptop", 60.0, 3600.0, 14400.0),
)


class HouseholdLoad:
    """The home's unmetered consumption: base load, morning and evening peaks and random appliance runs.

    Not a network module.  The home binds it to a seeded generator; appliance events depend only on time, so
    the series does not depend on how finely the home is stepped.
    """

    __slots__ = (
        "_demand",
        "_events",
        "_next_event",
        "_rng",
        "appliance_events",
        "base_w",
        "evening_peak_w",
        "mean_event_gap_s",
        "morning_peak_w",
    )

    def __init__(
        self,
        *,
        base_w: float = 250.0,
        morning_peak_w: float = 600.0,
        evening_peak_w: float = 1200.0,
        appliance_events: bool = True,
        mean_event_gap_s: float = 2400.0,
    ) -> None:
        if min(base_w, morning_peak_w, evening_peak_w) < 0 or mean_event_gap_s <= 0:
            raise ValueError("household load powers must be >= 0 and the event gap > 0")
        self.base_w = base_w
        self.morning_peak_w = morning_peak_w
        self.evening_peak_w = evening_peak_w
        self.appliance_events = appliance_events
        self.mean_event_gap_s = mean_event_gap_s
        self._rng = random.Random(0)
        self._events: list[tuple[float, float]] = []  # (end time, power)
        self._next_event = math.inf
        self._demand = 0.0

    def _bind(self, rng: random.Random, t0: float) -> None:
        self._rng = rng
        self._events = []
        self._next_event = t0 + rng.expovariate(1.0 / self.mean_event_gap_s)

    @property
    def demand_w(self) -> float:
        """Demand at the home's last step (before any outage shortfall), W."""
        return self._demand

    def _compute(self, t: float, local_hour: float) -> float:
        morning = _bump(local_hour, 7.5, 1.0)
        evening = _bump(local_hour, 19.0, 1.5)
        p = self.base_w + self.morning_peak_w * morning + self.evening_peak_w * evening
        if self.appliance_events:
            rng = self._rng
            while self._next_event <= t:
                start = self._next_event
                hour = (local_hour - (t - start) / 3600.0) % 24.0
                activity = 0.15 + 0.85 * max(
                    _bump(hour, 7.5, 1.0), _bump(hour, 19.0, 1.5), 0.5 if 8.0 <= hour < 22.0 else 0.0
                )
                _, watts, shortest, longest = _APPLIANCES[rng.randrange(len(_APPLIANCES))]
                duration = rng.uniform(shortest, longest)
                if rng.random() < activity:
                    self._events.append((start + duration, watts))
                self._next_event = start + rng.expovariate(1.0 / self.mean_event_gap_s)
            if self._events:
                self._events = [e for e in self._events if e[0] > t]
                for _, watts in self._events:
                    p += watts
        self._demand = p
        return p


class PlugProfile(Protocol):
    """What a smart plug's load draws when its relay is on."""

    @property
    def name(self) -> str: ...

    @property
    def rated_w(self) -> float: ...

    def bind(self, rng: random.Random, t0: float, utc_offset_s: float) -> None:
        """Called once when the plug joins a home."""

    def demand_w(self, t: float, local_hour: float) -> float:
        """Power the load wants at simulated time ``t`` (>= 0); called once per step, in time order."""

    def served(self, power_w: float, dt_s: float) -> None:
        """The load actually drew ``power_w`` for ``dt_s`` seconds."""


class ConstantProfile:
    """A load that always draws the same power (lamps, a server, benchmark filler)."""

    __slots__ = ("draw_w", "name", "rated_w")

    def __init__(self, draw_w: float, *, name: str = "constant") -> None:
        if draw_w < 0:
            raise ValueError("draw_w must be >= 0")
        self.draw_w = draw_w
        self.name = name
        self.rated_w = draw_w

    def bind(self, rng: random.Random, t0: float, utc_offset_s: float) -> None:
        return None

    def demand_w(self, t: float, local_hour: float) -> float:
        return self.draw_w

    def served(self, power_w: float, dt_s: float) -> None:
        return None


class FridgeProfile:
    """A compressor cycling on and off (durations jittered ±20 %), whatever the relay does."""

    __slots__ = ("_next", "_rng", "_running", "draw_w", "name", "off_s", "on_s", "rated_w")

    def __init__(self, draw_w: float = 120.0, *, on_s: float = 720.0, off_s: float = 1680.0) -> None:
        if draw_w < 0 or on_s <= 0 or off_s <= 0:
            raise ValueError("fridge draw must be >= 0 and its on/off times > 0")
        self.name = "fridge"
        self.draw_w = draw_w
        self.rated_w = draw_w * 1.25
        self.on_s = on_s
        self.off_s = off_s
        self._rng = random.Random(0)
        self._running = False
        self._next = math.inf

    def bind(self, rng: random.Random, t0: float, utc_offset_s: float) -> None:
        self._rng = rng
        self._running = rng.random() < self.on_s / (self.on_s + self.off_s)
        self._next = t0 + rng.uniform(0.0, self.on_s if self._running else self.off_s)

    def demand_w(self, t: float, local_hour: float) -> float:
        while self._next <= t:
            self._running = not self._running
            base = self.on_s if self._running else self.off_s
            self._next += base * self._rng.uniform(0.8, 1.2)
        return self.draw_w if self._running else 0.0

    def served(self, power_w: float, dt_s: float) -> None:
        return None


class EvChargerProfile:
    """An EV plugged in every evening, wanting a random amount of energy; charging pauses while off."""

    __slots__ = (
        "_need_wh",
        "_next_arrival",
        "_offset",
        "_rng",
        "arrival_hour",
        "charge_w",
        "max_session_wh",
        "min_session_wh",
        "name",
        "rated_w",
    )

    def __init__(
        self,
        charge_w: float = 1440.0,
        *,
        arrival_hour: float = 18.0,
        min_session_wh: float = 3000.0,
        max_session_wh: float = 12000.0,
    ) -> None:
        if charge_w <= 0 or not 0 <= min_session_wh <= max_session_wh:
            raise ValueError("EV charge power must be > 0 and 0 <= min_session_wh <= max_session_wh")
        self.name = "ev-charger"
        self.charge_w = charge_w
        self.rated_w = charge_w
        self.arrival_hour = arrival_hour
        self.min_session_wh = min_session_wh
        self.max_session_wh = max_session_wh
        self._rng = random.Random(0)
        self._need_wh = 0.0
        self._next_arrival = math.inf
        self._offset = 0.0

    @property
    def need_wh(self) -> float:
        """Energy the car still wants, Wh."""
        return self._need_wh

    def _arrival_on(self, day: int) -> float:
        jitter_h = self._rng.uniform(-1.0, 1.0)
        return day * 86400.0 - self._offset + (self.arrival_hour + jitter_h) * 3600.0

    def bind(self, rng: random.Random, t0: float, utc_offset_s: float) -> None:
        self._rng = rng
        self._offset = utc_offset_s
        day = math.floor((t0 + utc_offset_s) / 86400.0)
        arrival = self._arrival_on(day)
        self._next_arrival = arrival if arrival > t0 else self._arrival_on(day + 1)

    def demand_w(self, t: float, local_hour: float) -> float:
        while self._next_arrival <= t:
            self._need_wh = min(
                self._need_wh + self._rng.uniform(self.min_session_wh, self.max_session_wh),
                2.0 * self.max_session_wh,
            )
            day = math.floor((self._next_arrival + self._offset) / 86400.0)
            self._next_arrival = self._arrival_on(day + 1)
        return self.charge_w if self._need_wh > 0.0 else 0.0

    def served(self, power_w: float, dt_s: float) -> None:
        self._need_wh = max(0.0, self._need_wh - power_w * dt_s / 3600.0)


class PoolPumpProfile:
    """A pool pump on a daily timer (local mean solar time)."""

    __slots__ = ("draw_w", "end_hour", "name", "rated_w", "start_hour")

    def __init__(self, draw_w: float = 750.0, *, start_hour: float = 10.0, end_hour: float = 16.0) -> None:
        if draw_w < 0:
            raise ValueError("draw_w must be >= 0")
        self.name = "pool-pump"
        self.draw_w = draw_w
        self.rated_w = draw_w * 1.2
        self.start_hour = start_hour
        self.end_hour = end_hour

    def bind(self, rng: random.Random, t0: float, utc_offset_s: float) -> None:
        return None

    def demand_w(self, t: float, local_hour: float) -> float:
        if self.start_hour <= self.end_hour:
            running = self.start_hour <= local_hour < self.end_hour
        else:
            running = local_hour >= self.start_hour or local_hour < self.end_hour
        return self.draw_w if running else 0.0

    def served(self, power_w: float, dt_s: float) -> None:
        return None


# --------------------------------------------------------------------------------------------------- modules


def _finite(value: float, name: str) -> float:
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number")
    return float(value)


class HomeModule:
    """Base of every module of a ``SimulatedHome``; implements ``devices.sim.base.SimulatedModule``."""

    __slots__ = ("_home", "_info")

    kind: ClassVar[DeviceKind] = DeviceKind.UNKNOWN

    def __init__(self, identity: Identity, capabilities: Capabilities) -> None:
        self._info = DeviceInfo(self.kind, identity, capabilities)
        self._home: SimulatedHome | None = None

    @property
    def info(self) -> DeviceInfo:
        return self._info

    @property
    def home(self) -> SimulatedHome:
        if self._home is None:
            raise RuntimeError(f"{self._info.device_id} is not part of a SimulatedHome (use add_module)")
        return self._home

    def telemetry(self) -> Telemetry:
        home = self.home
        with home._lock:
            home._advance(force=False)
            return self._sample(home)

    def apply(self, setpoint: Setpoint, *, revert_after_s: float | None = None) -> None:
        """Validate and take a setpoint.  Every call re-arms the watchdog: after ``revert_after_s`` real
        seconds without a new setpoint the module returns to its default; ``None`` disarms it."""
        if revert_after_s is not None and not (math.isfinite(revert_after_s) and revert_after_s > 0):
            raise ValueError("revert_after_s must be a positive number of seconds")
        home = self.home
        if setpoint.release:
            # Back to the module's own default now, and nothing left to revert.
            with home._lock:
                home._advance(force=True)
                self._restore_default()
                home._arm_watchdog(self, None)
                home._evaluate(home._t, 0.0)
            return
        self._validate(setpoint)
        with home._lock:
            home._advance(force=True)
            self._set(setpoint)
            home._arm_watchdog(self, revert_after_s)
            home._evaluate(home._t, 0.0)

    # -- per kind
    def _validate(self, setpoint: Setpoint) -> None:
        raise NotImplementedError

    def _set(self, setpoint: Setpoint) -> None:
        raise NotImplementedError

    def _restore_default(self) -> None:
        raise NotImplementedError

    def _sample(self, home: SimulatedHome) -> Telemetry:
        raise NotImplementedError

    def _bind(self, home: SimulatedHome, rng: random.Random) -> None:
        self._home = home

    def _reject_fields(self, setpoint: Setpoint, allowed: str | None) -> None:
        what = {"power_limit_pct": "microinverters", "battery_power_w": "energystorage", "on": "smart plugs"}
        for name, applies_to in what.items():
            if name != allowed and getattr(setpoint, name) is not None:
                raise ValueError(f"{name} applies to {applies_to} only, not to a {self.kind.value}")


class SimMicroinverter(HomeModule):
    """A PV panel and its microinverter: clear sky x clouds x panel rating x efficiency, clipped by the rated
    AC power and the active power limit."""

    __slots__ = (
        "_avail_w",
        "_energy_wh",
        "_k",
        "_limit_pct",
        "_power_w",
        "_temp_c",
        "_tripped",
        "_v_offset",
        "efficiency",
        "panel_dc_w",
        "rated_ac_w",
    )

    kind = DeviceKind.MICROINVERTER
    _START_W = 2.0  # below this much available power the inverter does not start
    _TAU_S = 300.0

    def __init__(
        self,
        identity: Identity,
        *,
        rated_ac_w: float = 400.0,
        panel_dc_w: float = 460.0,
        efficiency: float = 0.965,
        orientation_factor: float = 1.0,
        energy_wh: float = 0.0,
    ) -> None:
        if rated_ac_w <= 0 or panel_dc_w <= 0 or not 0 < efficiency <= 1 or not 0 < orientation_factor <= 1.2:
            raise ValueError("microinverter ratings must be positive and efficiencies within (0, 1]")
        super().__init__(identity, Capabilities(rated_power_w=rated_ac_w, controllable=True))
        self.rated_ac_w = rated_ac_w
        self.panel_dc_w = panel_dc_w
        self.efficiency = efficiency
        self._k = panel_dc_w * orientation_factor * efficiency / 1000.0
        self._energy_wh = energy_wh
        self._limit_pct = 100.0
        self._avail_w = 0.0
        self._power_w = 0.0
        self._tripped = False
        self._temp_c = 20.0
        self._v_offset = 0.0

    def _bind(self, home: SimulatedHome, rng: random.Random) -> None:
        super()._bind(home, rng)
        self._v_offset = rng.uniform(-1.0, 1.0)
        self._temp_c = home._ambient

    def _offer(self, irradiance: float, tripped: bool) -> float:
        avail = self._k * irradiance
        if avail < self._START_W:
            avail = 0.0
        elif avail > self.rated_ac_w:
            avail = self.rated_ac_w
        self._avail_w = avail
        self._tripped = tripped
        if tripped:
            p = 0.0
        else:
            cap = self.rated_ac_w * self._limit_pct / 100.0
            p = avail if avail < cap else cap
        self._power_w = p
        return p

    def _commit(self, dt: float, ambient_c: float) -> None:
        p = self._power_w
        self._energy_wh += p * dt / 3600.0
        target = ambient_c + 25.0 * p / self.rated_ac_w
        self._temp_c = target + (self._temp_c - target) * math.exp(-dt / self._TAU_S)

    def _validate(self, setpoint: Setpoint) -> None:
        self._reject_fields(setpoint, "power_limit_pct")
        if setpoint.power_limit_pct is not None:
            pct = _finite(setpoint.power_limit_pct, "power_limit_pct")
            if not 0.0 <= pct <= 100.0:
                raise ValueError(f"power_limit_pct {pct:g} is outside 0..100 %")

    def _set(self, setpoint: Setpoint) -> None:
        if setpoint.power_limit_pct is not None:
            self._limit_pct = float(setpoint.power_limit_pct)

    def _restore_default(self) -> None:
        self._limit_pct = 100.0

    def _sample(self, home: SimulatedHome) -> Telemetry:
        p = self._power_w
        if self._tripped or self._avail_w <= 0.0:
            state = OperatingState.STANDBY
        elif p < self._avail_w - 0.01:
            state = OperatingState.THROTTLED
        else:
            state = OperatingState.RUNNING
        v = home._grid_v
        if v > 0.0:
            v += self._v_offset + 0.005 * p
        return Telemetry(
            ts=home._t,
            state=state,
            power_w=p,
            energy_out_wh=self._energy_wh,
            voltage_v=v,
            current_a=p / v if v > 0.0 else 0.0,
            frequency_hz=home._freq if v > 0.0 else None,
            temperature_c=self._temp_c,
            power_limit_pct=self._limit_pct,
        )


class SimBattery(HomeModule):
    """A home battery: SoC integrates AC power through separate charge and discharge efficiencies within a SoC
    window and power limits; temperature follows |power|; SoH fades with throughput.  Without a setpoint it
    does self-consumption (brings the grid to zero as far as it can)."""

    __slots__ = (
        "_c_w",
        "_d_w",
        "_energy_in_wh",
        "_energy_out_wh",
        "_power_w",
        "_setpoint_w",
        "_soc",
        "_soh",
        "_temp_c",
        "_v_offset",
        "capacity_wh",
        "charge_efficiency",
        "discharge_efficiency",
        "max_charge_w",
        "max_discharge_w",
        "max_soc_pct",
        "min_soc_pct",
        "soh_fade_pct_per_cycle",
    )

    kind = DeviceKind.ENERGYSTORAGE
    _TAU_S = 1800.0
    _K_PER_W = 0.004  # steady-state temperature rise per W of |power|

    def __init__(
        self,
        identity: Identity,
        *,
        capacity_wh: float = 5000.0,
        max_charge_w: float = 2500.0,
        max_discharge_w: float = 2500.0,
        min_soc_pct: float = 10.0,
        max_soc_pct: float = 100.0,
        soc_pct: float = 50.0,
        soh_pct: float = 100.0,
        charge_efficiency: float = 0.95,
        discharge_efficiency: float = 0.95,
        soh_fade_pct_per_cycle: float = 0.004,
        energy_in_wh: float = 0.0,
        energy_out_wh: float = 0.0,
    ) -> None:
        if capacity_wh <= 0 or max_charge_w <= 0 or max_discharge_w <= 0:
            raise ValueError("battery capacity and power limits must be positive")
        if not 0.0 <= min_soc_pct < max_soc_pct <= 100.0 or not 0.0 <= soc_pct <= 100.0:
            raise ValueError("need 0 <= min_soc_pct < max_soc_pct <= 100 and soc_pct within 0..100")
        if not 0.0 < soh_pct <= 100.0 or soh_fade_pct_per_cycle < 0:
            raise ValueError("soh_pct must be in (0, 100] and the fade >= 0")
        if not (0.0 < charge_efficiency <= 1.0 and 0.0 < discharge_efficiency <= 1.0):
            raise ValueError("efficiencies must be within (0, 1]")
        super().__init__(
            identity,
            Capabilities(
                rated_power_w=max_discharge_w,
                capacity_wh=capacity_wh,
                max_charge_w=max_charge_w,
                max_discharge_w=max_discharge_w,
                min_soc_pct=min_soc_pct,
                max_soc_pct=max_soc_pct,
                controllable=True,
            ),
        )
        self.capacity_wh = capacity_wh
        self.max_charge_w = max_charge_w
        self.max_discharge_w = max_discharge_w
        self.min_soc_pct = min_soc_pct
        self.max_soc_pct = max_soc_pct
        self.charge_efficiency = charge_efficiency
        self.discharge_efficiency = discharge_efficiency
        self.soh_fade_pct_per_cycle = soh_fade_pct_per_cycle
        self._soc = soc_pct
        self._soh = soh_pct
        self._energy_in_wh = energy_in_wh
        self._energy_out_wh = energy_out_wh
        self._setpoint_w: float | None = None
        self._power_w = 0.0
        self._c_w = 0.0
        self._d_w = 0.0
        self._temp_c = 21.0
        self._v_offset = 0.0

    @property
    def setpoint_w(self) -> float | None:
        """The battery_power_w being followed, or ``None`` in self-consumption."""
        return self._setpoint_w

    def _bind(self, home: SimulatedHome, rng: random.Random) -> None:
        super()._bind(home, rng)
        self._v_offset = rng.uniform(-0.5, 0.5)
        self._temp_c = home._indoor

    def _limits(self, dt: float) -> tuple[float, float]:
        """Charge and discharge power available over the next ``dt`` seconds, W (both >= 0)."""
        if dt > 0.0:
            cap = self.capacity_wh * self._soh / 100.0
            per_w = 3600.0 / dt
            headroom = max(0.0, (self.max_soc_pct - self._soc) * cap / 100.0)
            stock = max(0.0, (self._soc - self.min_soc_pct) * cap / 100.0)
            c = min(self.max_charge_w, headroom / self.charge_efficiency * per_w)
            d = min(self.max_discharge_w, stock * self.discharge_efficiency * per_w)
        else:
            c = self.max_charge_w if self._soc < self.max_soc_pct else 0.0
            d = self.max_discharge_w if self._soc > self.min_soc_pct else 0.0
        self._c_w = c
        self._d_w = d
        return c, d

    def _commit(self, dt: float, indoor_c: float) -> None:
        p = self._power_w
        e_ac = p * dt / 3600.0
        cap = self.capacity_wh * self._soh / 100.0
        old = self._soc
        if p > 0.0:
            self._energy_out_wh += e_ac
            chem = e_ac / self.discharge_efficiency
            self._soc = max(old - chem / cap * 100.0, min(old, self.min_soc_pct))
        elif p < 0.0:
            self._energy_in_wh -= e_ac
            chem = -e_ac * self.charge_efficiency
            self._soc = min(old + chem / cap * 100.0, max(old, self.max_soc_pct))
        else:
            chem = 0.0
        if chem:
            self._soh = max(0.0, self._soh - self.soh_fade_pct_per_cycle * chem / (2.0 * self.capacity_wh))
        target = indoor_c + self._K_PER_W * abs(p)
        self._temp_c = target + (self._temp_c - target) * math.exp(-dt / self._TAU_S)

    def _validate(self, setpoint: Setpoint) -> None:
        self._reject_fields(setpoint, "battery_power_w")
        if setpoint.battery_power_w is not None:
            w = _finite(setpoint.battery_power_w, "battery_power_w")
            if not -self.max_charge_w <= w <= self.max_discharge_w:
                raise ValueError(
                    f"battery_power_w {w:g} W is outside -{self.max_charge_w:g}..{self.max_discharge_w:g} W "
                    "(negative charges, positive discharges)"
                )

    def _set(self, setpoint: Setpoint) -> None:
        # ``None`` hands the battery back to its own self-consumption logic (devices.model.Setpoint).
        bp = setpoint.battery_power_w
        self._setpoint_w = None if bp is None else float(bp)

    def _restore_default(self) -> None:
        self._setpoint_w = None

    def _sample(self, home: SimulatedHome) -> Telemetry:
        p = self._power_w
        v = home._grid_v
        if v > 0.0:
            v += self._v_offset + 0.002 * p
        return Telemetry(
            ts=home._t,
            state=OperatingState.RUNNING if abs(p) > 0.5 else OperatingState.STANDBY,
            power_w=p,
            energy_out_wh=self._energy_out_wh,
            energy_in_wh=self._energy_in_wh,
            voltage_v=v,
            current_a=p / v if v > 0.0 else 0.0,
            frequency_hz=home._freq if v > 0.0 else None,
            temperature_c=self._temp_c,
            soc_pct=self._soc,
            soh_pct=self._soh,
        )


class SimSmartPlug(HomeModule):
    """A switchable load with its own profile; ``power_w`` is negative while it draws."""

    __slots__ = ("_demand_w", "_energy_in_wh", "_on", "_power_w", "_shed", "profile")

    kind = DeviceKind.SMARTPLUG

    def __init__(
        self,
        identity: Identity,
        profile: PlugProfile,
        *,
        priority: int = 5,
        critical: bool = False,
        rated_power_w: float | None = None,
        on: bool = True,
        energy_in_wh: float = 0.0,
    ) -> None:
        rated = profile.rated_w if rated_power_w is None else rated_power_w
        super().__init__(
            identity,
            Capabilities(rated_power_w=rated, controllable=True, priority=priority, critical=critical),
        )
        self.profile = profile
        self._on = on
        self._shed = False
        self._demand_w = 0.0
        self._power_w = 0.0
        self._energy_in_wh = energy_in_wh

    @property
    def priority(self) -> int:
        p = self._info.capabilities.priority
        return 0 if p is None else p

    @property
    def critical(self) -> bool:
        return self._info.capabilities.critical

    @property
    def shed(self) -> bool:
        """True while the island shed this plug at the last step."""
        return self._shed

    def _bind(self, home: SimulatedHome, rng: random.Random) -> None:
        super()._bind(home, rng)
        self.profile.bind(rng, home._t, home.location.utc_offset_s)

    def _validate(self, setpoint: Setpoint) -> None:
        self._reject_fields(setpoint, "on")

    def _set(self, setpoint: Setpoint) -> None:
        if setpoint.on is not None:
            self._on = bool(setpoint.on)

    def _restore_default(self) -> None:
        self._on = True

    def _sample(self, home: SimulatedHome) -> Telemetry:
        p = self._power_w
        relay = self._on and not self._shed
        if not relay:
            state = OperatingState.OFF
        elif p < -0.5:
            state = OperatingState.RUNNING
        else:
            state = OperatingState.STANDBY
        v = home._grid_v
        return Telemetry(
            ts=home._t,
            state=state,
            power_w=p,
            energy_in_wh=self._energy_in_wh,
            voltage_v=v,
            current_a=p / v if v > 0.0 else 0.0,
            frequency_hz=home._freq if v > 0.0 else None,
            on=relay,
        )


class SimGridMeter(HomeModule):
    """The meter at the grid connection point: imports positive, exports negative; 0 W during an outage."""

    __slots__ = ("_export_wh", "_import_wh")

    kind = DeviceKind.METER

    def __init__(self, identity: Identity, *, import_wh: float = 0.0, export_wh: float = 0.0) -> None:
        super().__init__(identity, Capabilities(controllable=False))
        self._import_wh = import_wh
        self._export_wh = export_wh

    def _commit(self, dt: float, grid_w: float) -> None:
        if grid_w > 0.0:
            self._import_wh += grid_w * dt / 3600.0
        else:
            self._export_wh -= grid_w * dt / 3600.0

    def _validate(self, setpoint: Setpoint) -> None:
        if not setpoint.is_empty():
            raise ValueError("a meter takes no setpoints")

    def _set(self, setpoint: Setpoint) -> None:
        return None

    def _restore_default(self) -> None:
        return None

    def _sample(self, home: SimulatedHome) -> Telemetry:
        ok = not home._outage
        p = home._grid_w
        v = home._grid_v if ok else 0.0
        return Telemetry(
            ts=home._t,
            state=OperatingState.RUNNING,
            power_w=p,
            energy_out_wh=self._import_wh,
            energy_in_wh=self._export_wh,
            voltage_v=v,
            current_a=p / v if v > 0.0 else 0.0,
            frequency_hz=home._freq if ok else None,
            grid_ok=ok,
        )


# --------------------------------------------------------------------------------------------------- home


@dataclass(frozen=True, slots=True)
class PowerBalance:
    """The home's power flows at one instant (W, sign convention of ``devices.model``).

    ``pv_w + battery_w + grid_w + plugs_w == household_w`` (plugs_w is <= 0); ``unserved_w`` is demand the
    island could not supply (unmetered load and shed critical plugs), ``shed_w`` the non-critical plugs shed.
    """

    ts: float
    pv_w: float
    battery_w: float
    grid_w: float
    plugs_w: float
    household_w: float
    unserved_w: float
    shed_w: float
    grid_ok: bool


M = TypeVar("M", bound=HomeModule)


def _share_discharge(batteries: list[SimBattery], want_w: float) -> float:
    total = 0.0
    for b in batteries:
        total += b._d_w
    take = min(want_w, total)
    if take <= 0.0:
        for b in batteries:
            b._power_w = 0.0
        return 0.0
    for b in batteries:
        b._power_w = take * b._d_w / total
    return take


def _share_charge(batteries: list[SimBattery], want_w: float) -> float:
    total = 0.0
    for b in batteries:
        total += b._c_w
    take = min(want_w, total)
    if take <= 0.0:
        for b in batteries:
            b._power_w = 0.0
        return 0.0
    for b in batteries:
        b._power_w = -take * b._c_w / total
    return take


class SimulatedHome:
    """A home of simulated modules on one clock, integrated lazily and consistently (see module docstring)."""

    def __init__(
        self,
        *,
        clock: SimClock | None = None,
        location: Location | None = None,
        seed: int = 1,
        load: HouseholdLoad | None = None,
        clouds: bool = True,
        frequency_hz: float = 60.0,
        nominal_voltage_v: float = 240.0,
        max_step_s: float = 1.0,
        max_steps: int = 30,
        min_real_interval_s: float = 0.05,
    ) -> None:
        if frequency_hz <= 0 or nominal_voltage_v <= 0 or max_step_s <= 0 or max_steps < 1:
            raise ValueError("frequency, voltage and max_step_s must be positive and max_steps >= 1")
        if min_real_interval_s < 0:
            raise ValueError("min_real_interval_s must be >= 0")
        self.clock = clock if clock is not None else SimClock()
        self.location = location if location is not None else Location()
        self.seed = seed
        self.load = load if load is not None else HouseholdLoad()
        self.frequency_hz = frequency_hz
        self.nominal_voltage_v = nominal_voltage_v
        self.max_step_s = max_step_s
        self.max_steps = max_steps
        self.min_real_interval_s = min_real_interval_s
        self._lock = threading.RLock()
        self._modules: list[HomeModule] = []
        self._ids: set[str] = set()
        self._inverters: list[SimMicroinverter] = []
        self._batteries: list[SimBattery] = []
        self._plugs: list[SimSmartPlug] = []
        self._meters: list[SimGridMeter] = []
        self._watchdogs: dict[HomeModule, float] = {}
        real = self.clock.real_now()
        self._last_real = real
        self._t = self.clock.sim_at(real)
        offset = self.location.utc_offset_s
        self.load._bind(random.Random(f"{seed}/household"), self._t)
        self._clouds = _Clouds(f"{seed}/clouds", self._t, offset) if clouds else None
        self._grid_rng = random.Random(f"{seed}/grid")
        self._v_x = self._grid_rng.gauss(0.0, 1.0)
        self._f_x = self._grid_rng.gauss(0.0, 1.0)
        self._outage = False
        self._grid_v = nominal_voltage_v
        self._freq = frequency_hz
        self._grid_w = 0.0
        self._household_w = 0.0
        self._unserved_w = 0.0
        self._shed_w = 0.0
        self._unserved_wh = 0.0
        self._shed_wh = 0.0
        self._ambient = 15.0
        self._indoor = 21.0
        self._irradiance = 0.0
        self._evaluate(self._t, 0.0)

    # -- building
    @property
    def modules(self) -> tuple[HomeModule, ...]:
        """Every module, in the order they were added."""
        return tuple(self._modules)

    def add_module(self, module: M) -> M:
        """Attach a module (its random streams derive from the home's seed and the module's serial)."""
        if module._home is not None:
            raise ValueError(f"{module.info.device_id} already belongs to a home")
        device_id = module.info.device_id
        if device_id in self._ids:
            raise ValueError(f"a module with device id {device_id} is already in this home")
        with self._lock:
            self._advance(force=True)
            module._bind(self, random.Random(f"{self.seed}/module/{device_id}"))
            self._ids.add(device_id)
            self._modules.append(module)
            if isinstance(module, SimMicroinverter):
                self._inverters.append(module)
            elif isinstance(module, SimBattery):
                self._batteries.append(module)
            elif isinstance(module, SimSmartPlug):
                self._plugs.append(module)
            elif isinstance(module, SimGridMeter):
                self._meters.append(module)
            self._evaluate(self._t, 0.0)
        return module

    # -- outside world
    def set_grid_outage(self, outage: bool) -> None:
        """Cut (True) or restore (False) the grid; from now on the home runs as an island or grid-tied."""
        with self._lock:
            self._advance(force=True)
            self._outage = bool(outage)
            self._evaluate(self._t, 0.0)

    @property
    def grid_ok(self) -> bool:
        return not self._outage

    @property
    def unserved_energy_wh(self) -> float:
        """Demand the island could not supply since the start (unmetered load, shed critical plugs), Wh."""
        with self._lock:
            self._advance(force=False)
            return self._unserved_wh

    @property
    def shed_energy_wh(self) -> float:
        """Energy non-critical plugs would have drawn while they were shed."""
        with self._lock:
            self._advance(force=False)
            return self._shed_wh

    def now(self) -> float:
        """Advance to now and return the simulated time of the current state (POSIX seconds)."""
        with self._lock:
            self._advance(force=True)
            return self._t

    def balance(self) -> PowerBalance:
        """The power flows at the current instant (advancing first), summed from the modules' state."""
        with self._lock:
            self._advance(force=False)
            return PowerBalance(
                ts=self._t,
                pv_w=sum(i._power_w for i in self._inverters),
                battery_w=sum(b._power_w for b in self._batteries),
                grid_w=self._grid_w,
                plugs_w=sum(p._power_w for p in self._plugs),
                household_w=self._household_w,
                unserved_w=self._unserved_w,
                shed_w=self._shed_w,
                grid_ok=not self._outage,
            )

    def snapshot(self) -> dict[str, Telemetry]:
        """Every module's telemetry at one instant, by device id, in module order."""
        with self._lock:
            self._advance(force=False)
            return {m.info.device_id: m._sample(self) for m in self._modules}

    # -- integration (called with the lock held)
    def _arm_watchdog(self, module: HomeModule, revert_after_s: float | None) -> None:
        if revert_after_s is None:
            self._watchdogs.pop(module, None)
        else:
            clock = self.clock
            self._watchdogs[module] = clock.sim_at(self._last_real + revert_after_s)

    def _fire_watchdogs(self, t: float) -> None:
        due = [m for m, deadline in self._watchdogs.items() if deadline <= t]
        for m in due:
            del self._watchdogs[m]
            m._restore_default()

    def _advance(self, *, force: bool) -> None:
        real = self.clock.real_now()
        if not force and real - self._last_real < self.min_real_interval_s:
            return
        target = self.clock.sim_at(real)
        t = self._t
        span = target - t
        if span <= 0.0:
            return
        self._last_real = real
        n = min(self.max_steps, max(1, math.ceil(span / self.max_step_s - 1e-9)))
        h = span / n
        t0 = t
        k = 0
        while k < n:
            end = target if k == n - 1 else t0 + (k + 1) * h
            deadline = min(self._watchdogs.values()) if self._watchdogs else math.inf
            if deadline <= end:
                if deadline > t:
                    self._evaluate(deadline, deadline - t)
                    t = deadline
                self._t = t
                self._fire_watchdogs(t)
                self._evaluate(t, 0.0)
                if t >= end:
                    k += 1
                continue
            self._evaluate(end, end - t)
            t = end
            k += 1
        self._t = target

    def _evaluate(self, t: float, dt: float) -> None:
        """Compute every power at instant ``t``; with ``dt > 0`` integrate (t - dt, t] at those powers."""
        loc = self.location
        local_hour = ((t + loc.utc_offset_s) / 3600.0) % 24.0
        if dt > 0.0:
            rng = self._grid_rng
            self._v_x = _ou_step(self._v_x, dt, 120.0, rng)
            self._f_x = _ou_step(self._f_x, dt, 30.0, rng)
        cloud = self._clouds.factor(t, dt) if self._clouds is not None else 1.0
        poa = clear_sky_irradiance_w_m2(t, loc.latitude_deg, loc.longitude_deg) * cloud
        ambient = _ambient_c(t, local_hour, loc.latitude_deg)
        indoor = 21.0 + 0.2 * (ambient - 21.0)
        cell = ambient + 0.025 * poa
        irradiance = poa * (1.0 - 0.0035 * (cell - 25.0))
        self._ambient = ambient
        self._indoor = indoor
        self._irradiance = irradiance

        outage = self._outage
        batteries = self._batteries
        island_dead = outage and not batteries  # no grid-forming source: PV trips, nothing is supplied
        pv = 0.0
        for inv in self._inverters:
            pv += inv._offer(irradiance, island_dead)
        house = self.load._compute(t, local_hour)
        plugs = self._plugs
        plug_demand = 0.0
        for plug in plugs:
            d = plug.profile.demand_w(t, local_hour)
            if not plug._on:
                d = 0.0
            plug._demand_w = d
            plug._shed = False
            plug_demand += d
        for b in batteries:
            b._limits(dt)

        house_served = house
        unserved = 0.0
        shed = 0.0
        curtail_scale = 1.0
        if not outage:
            fixed = 0.0
            free: list[SimBattery] = []
            for b in batteries:
                sp = b._setpoint_w
                if sp is None:
                    free.append(b)
                else:
                    p = max(min(sp, b._d_w), -b._c_w)
                    b._power_w = p
                    fixed += p
            need = house + plug_demand - pv - fixed
            if free:
                if need >= 0.0:
                    fixed += _share_discharge(free, need)
                else:
                    fixed -= _share_charge(free, -need)
            grid = house + plug_demand - pv - fixed
        elif island_dead:
            for plug in plugs:
                if plug._demand_w > 0.0:
                    plug._shed = True
                    if plug.critical:
                        unserved += plug._demand_w
                    else:
                        shed += plug._demand_w
            unserved += house
            house_served = 0.0
            for b in batteries:
                b._power_w = 0.0
            grid = 0.0
        else:
            supply = pv
            for b in batteries:
                supply += b._d_w
            served_plugs = plug_demand
            if house + served_plugs > supply:
                order = sorted(
                    (p for p in plugs if p._demand_w > 0.0 and not p.critical),
                    key=lambda p: p.priority,
                )
                for plug in order:
                    if house + served_plugs <= supply:
                        break
                    plug._shed = True
                    served_plugs -= plug._demand_w
                    shed += plug._demand_w
                if house + served_plugs > supply:
                    # Every non-critical plug is off: the unmetered load browns out before critical plugs.
                    crit = sorted(
                        (p for p in plugs if p._demand_w > 0.0 and p.critical), key=lambda p: p.priority
                    )
                    for plug in crit:
                        if served_plugs <= supply:
                            break
                        plug._shed = True
                        served_plugs -= plug._demand_w
                        unserved += plug._demand_w
                    house_served = min(house, max(0.0, supply - served_plugs))
                    unserved += house - house_served
            net = house_served + served_plugs - pv
            if net >= 0.0:
                _share_discharge(batteries, net)
            else:
                took = _share_charge(batteries, -net)
                excess = -net - took
                if excess > 0.0 and pv > 0.0:
                    curtail_scale = (pv - excess) / pv
                    for inv in self._inverters:
                        inv._power_w *= curtail_scale
            grid = 0.0

        for plug in plugs:
            plug._power_w = 0.0 if plug._shed else -plug._demand_w
        self._grid_w = grid
        self._household_w = house_served
        self._unserved_w = unserved
        self._shed_w = shed
        if island_dead:
            self._grid_v = 0.0
            self._freq = self.frequency_hz
        elif outage:  # the battery forms the grid; it raises the frequency to curtail PV (frequency-watt)
            self._grid_v = self.nominal_voltage_v
            self._freq = self.frequency_hz + min(1.5, 2.0 * (1.0 - curtail_scale))
        else:
            self._grid_v = self.nominal_voltage_v * (1.0 + 0.006 * self._v_x)
            self._freq = self.frequency_hz + 0.012 * self._f_x

        if dt > 0.0:
            for inv in self._inverters:
                inv._commit(dt, ambient)
            for b in batteries:
                b._commit(dt, indoor)
            for plug in plugs:
                p = -plug._power_w
                plug._energy_in_wh += p * dt / 3600.0
                plug.profile.served(p, dt)
            for meter in self._meters:
                meter._commit(dt, grid)
            self._unserved_wh += unserved * dt / 3600.0
            self._shed_wh += shed * dt / 3600.0


# --------------------------------------------------------------------------------------------------- demo


#: The invented vendors of the demo home (each has a public demo key: ``devices.attest.demo_vendor_key``).
DEMO_VENDORS = ("Helio Demo", "Voltacell Demo", "Gridwise Demo", "Plugly Demo")


def build_demo_home(
    *,
    speedup: float = 1.0,
    seed: int = 1,
    start: datetime | None = None,
    n_inverters: int = 3,
    n_batteries: int = 1,
    n_plugs: int = 3,
    time_source: TimeSource = time.time,
    clouds: bool = True,
    location: Location | None = None,
    min_real_interval_s: float = 0.05,
) -> SimulatedHome:
    """A plausible home: 400 W microinverters, 5 kWh / 2.5 kW batteries, one grid meter and smart plugs
    (fridge: critical, priority 10; EV charger: priority 1; pool pump: priority 2; then plain loads)."""
    if min(n_inverters, n_batteries, n_plugs) < 0:
        raise ValueError("module counts must be >= 0")
    clock = SimClock(speedup=speedup, start=start, time_source=time_source)
    home = SimulatedHome(
        clock=clock, location=location, seed=seed, clouds=clouds, min_real_interval_s=min_real_interval_s
    )
    rng = random.Random(f"{seed}/demo")
    for i in range(n_inverters):
        home.add_module(
            SimMicroinverter(
                Identity("Helio Demo", "HD-400M", f"HD4{seed:03d}{i + 1:05d}", "2.3.1"),
                orientation_factor=rng.uniform(0.96, 1.0),
                energy_wh=rng.uniform(200_000.0, 900_000.0),
            )
        )
    for i in range(n_batteries):
        home.add_module(
            SimBattery(
                Identity("Voltacell Demo", "VC-5K", f"VC5{seed:03d}{i + 1:05d}", "1.8.0"),
                soc_pct=rng.uniform(40.0, 70.0),
                soh_pct=rng.uniform(96.0, 99.5),
            )
        )
    home.add_module(SimGridMeter(Identity("Gridwise Demo", "GW-M1", f"GWM{seed:03d}00001", "3.0.2")))
    for i in range(n_plugs):
        profile: PlugProfile
        if i == 0:
            profile, priority, critical = FridgeProfile(), 10, True
        elif i == 1:
            profile, priority, critical = EvChargerProfile(), 1, False
        elif i == 2:
            profile, priority, critical = PoolPumpProfile(), 2, False
        else:
            profile = ConstantProfile(rng.choice((8.0, 40.0, 60.0, 150.0)), name="appliance")
            priority, critical = 3 + (i - 3) % 6, False
        home.add_module(
            SimSmartPlug(
                Identity("Plugly Demo", "PL-15A", f"PLG{seed:03d}{i + 1:05d}", "0.9.4"),
                profile,
                priority=priority,
                critical=critical,
            )
        )
    return home

"""The account page's chart, drawn on the server as SVG: no script, no library, nothing
fetched, readable with styles off (each bar has its <title>), and within the page's CSP.

Pure: periods in, markup out. Bars stack the messages created in each period by outcome
(delivered, failed, pending); a line over them is the credits spent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from html import escape
from zoneinfo import ZoneInfo

from gateway.credits import format_credits
from gateway.records import MessageStats

WIDTH = 600
HEIGHT = 160
_TOP = 10
_BOTTOM = 20
_LEFT = 34


@dataclass(frozen=True, slots=True)
class Totals:
    delivered: int
    failed: int
    pending: int
    credits: int

    @property
    def messages(self) -> int:
        return self.delivered + self.failed + self.pending

    @property
    def delivery_rate(self) -> float | None:
        """Delivered among the messages whose outcome is known, in percent."""
        final = self.delivered + self.failed
        return None if not final else 100.0 * self.delivered / final


# Every time zone's midnight falls on a quarter of an hour (UTC+5:45 included): periods
# this short fold exactly into local days, whatever their length.
QUARTER = 900.0


def days_window(now: float, tz: ZoneInfo, days: int) -> tuple[float, int]:
    """The start (local midnight, `days - 1` days before today's) and the number of
    quarters up to the end of today: what to ask the store before `by_day`."""
    today = datetime.fromtimestamp(now, tz).date()
    first = datetime.combine(today - timedelta(days=days - 1), datetime.min.time(), tz)
    end = datetime.combine(today + timedelta(days=1), datetime.min.time(), tz)
    return first.timestamp(), round((end.timestamp() - first.timestamp()) / QUARTER)


def by_day(series: Sequence[MessageStats], tz: ZoneInfo) -> list[MessageStats]:
    """Short periods folded into the local days they start in, each starting at its local
    midnight: a day when the clocks change has 23 or 25 hours, not 24 shifted by one."""
    days: dict[date, MessageStats] = {}
    for period in series:
        day = datetime.fromtimestamp(period.start, tz).date()
        was = days.get(day)
        if was is None:
            midnight = datetime.combine(day, datetime.min.time(), tz).timestamp()
            was = MessageStats(midnight)
        days[day] = MessageStats(was.start, was.delivered + period.delivered,
                                 was.failed + period.failed, was.pending + period.pending,
                                 was.credits + period.credits)
    return list(days.values())


def totals(series: Sequence[MessageStats]) -> Totals:
    return Totals(sum(s.delivered for s in series), sum(s.failed for s in series),
                  sum(s.pending for s in series), sum(s.credits for s in series))


def svg(series: Sequence[MessageStats], title: str, label: Callable[[float], str]) -> str:
    """The chart of `series`; `label(start)` names a period (an hour, a day)."""
    plot_h = HEIGHT - _TOP - _BOTTOM
    count = max(1, len(series))
    step = (WIDTH - _LEFT) / count
    tallest = max([s.delivered + s.failed + s.pending for s in series] + [1])
    dearest = max([s.credits for s in series] + [1])
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" '
             f'class="chart" role="img" aria-label="{escape(title)}">',
             f"<title>{escape(title)}</title>",
             f'<line x1="{_LEFT}" y1="{HEIGHT - _BOTTOM}" x2="{WIDTH}" '
             f'y2="{HEIGHT - _BOTTOM}" class="axis"/>',
             f'<text x="{_LEFT - 4}" y="{_TOP + 8}" class="tick" text-anchor="end">'
             f"{tallest}</text>",
             f'<text x="{_LEFT - 4}" y="{HEIGHT - _BOTTOM}" class="tick" '
             'text-anchor="end">0</text>']
    points = []
    for index, period in enumerate(series):
        x = _LEFT + index * step
        bottom = float(HEIGHT - _BOTTOM)
        tip = (f"{label(period.start)}: {period.delivered} delivered, {period.failed} "
               f"failed, {period.pending} pending, {format_credits(period.credits)} credits")
        parts.append(f"<g><title>{escape(tip)}</title>")
        for css, value in (("delivered", period.delivered), ("failed", period.failed),
                           ("pending", period.pending)):
            if not value:
                continue
            height = plot_h * value / tallest
            bottom -= height
            parts.append(f'<rect x="{x + step * 0.1:.1f}" y="{bottom:.1f}" '
                         f'width="{step * 0.8:.1f}" height="{height:.1f}" class="{css}"/>')
        parts.append("</g>")
        points.append(f"{x + step / 2:.1f},"
                      f"{HEIGHT - _BOTTOM - plot_h * period.credits / dearest:.1f}")
        if index % max(1, count // 6) == 0:
            parts.append(f'<text x="{x + step / 2:.1f}" y="{HEIGHT - 6}" class="tick" '
                         f'text-anchor="middle">{escape(label(period.start))}</text>')
    parts.append(f'<polyline points="{" ".join(points)}" class="credits"/>')
    parts.append("</svg>")
    return "".join(parts)

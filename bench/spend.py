"""CPU of spend: the budget check per request, pricing and the whole record, ledger throughput.

Measured in-process on this machine: ``admit`` (the per-request check, in memory) with budgets
for the client, a team and the organisation; ``PriceBook.cost`` per record; ``records`` per
record (price, settle the reservation, charge, queue the row); and rows per second written by
one flush to SQLite and to a PostgreSQL started from Debian's package on a free port.
``python bench/spend.py`` (``make bench`` runs it too).
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(1, str(path))

from harness.postgres import postgres  # noqa: E402

from extproc.config.spend import Budget, Spend  # noqa: E402
from extproc.spend.budgets import Budgets  # noqa: E402
from extproc.spend.prices import PriceBook  # noqa: E402
from extproc.spend.service import SpendService, open_database  # noqa: E402
from extproc.usage.record import UsageRecord  # noqa: E402

BIG = Decimal(10**8)  # caps never reached: every check admits
BUDGETS = {
    "default": Budget(day=BIG), "teams": (("ml", Budget(month=BIG)),),
    "organisation": Budget(month=BIG),
}  # fmt: skip


def record(i: int, model: str = "claude-sonnet-4-5") -> UsageRecord:
    return UsageRecord(
        time.time(), f"r{i}", "anthropic", f"c{i % 50}", ("ml",), "injected", model, 200, 5,
        "session", input=3000, output=500, cache_read=20000, cache_creation_5m=1000,
    )  # fmt: skip


def cpu_us(run: Callable[[], None], count: int) -> float:
    start = time.process_time()
    run()
    return (time.process_time() - start) / count * 1e6


def check_us() -> float:
    budgets = Budgets(Spend(reservation_timeout_s=3600, **BUDGETS))
    n = 200_000

    def run() -> None:
        for _ in range(n):
            budgets.admit("alice", ("ml",))

    return cpu_us(run, n)


def price_us(model: str) -> float:
    book, one = PriceBook(), record(0, model)
    book.cost(one)
    n = 20_000
    return cpu_us(lambda: [book.cost(one) for _ in range(n)] and None, n)


def ledger(spend: Spend) -> tuple[float, float]:
    """CPU per record in ``records`` and rows per second of one flush."""
    service = SpendService(spend, open_database(spend))
    batch = [record(i) for i in range(20_000)]
    per_record = cpu_us(lambda: service.records(batch), len(batch))
    start = time.perf_counter()
    written = service.flush()
    rate = written / (time.perf_counter() - start)
    service.close()
    return per_record, rate


def main() -> None:
    print(f"budget check (client + team + organisation): {check_us():.2f} us CPU per request")
    for model in ("claude-sonnet-4-5", "gpt-4o-mini"):
        print(f"pricing {model}: {price_us(model):.1f} us CPU per record")
    with tempfile.TemporaryDirectory() as folder:
        cpu, rate = ledger(Spend(state_dir=Path(folder), **BUDGETS))
    print(f"sqlite: {cpu:.1f} us CPU per record; ledger {rate:,.0f} rows/s in one flush")
    with postgres() as server:
        cpu, rate = ledger(Spend(store=server.url, **BUDGETS))
    print(f"postgresql: {cpu:.1f} us CPU per record; ledger {rate:,.0f} rows/s in one flush")


if __name__ == "__main__":
    main()

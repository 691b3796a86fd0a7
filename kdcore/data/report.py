"""What data preparation kept, cut and dropped, per split, as text lines or a rich table."""

from __future__ import annotations

from dataclasses import dataclass, field

from kdcore.data.common import Sample

MAX_BAD_EXAMPLES = 5  # bad rows shown in the report; the rest are only counted


@dataclass
class SplitReport:
    """Counts for one split (train or eval)."""

    source: str = ""
    rows: int = 0  # rows read from the source (after data.limit)
    bad_rows: int = 0
    bad_examples: list[tuple[int, str]] = field(default_factory=list)  # (row, reason), first few
    overlong: int = 0  # samples longer than max_length before the policy
    truncated: int = 0
    dropped_overlong: int = 0  # overlong=drop, or nothing trainable left after truncation
    samples: int = 0
    tokens: int = 0  # student tokens kept
    loss_tokens: int = 0  # student positions in the loss
    max_tokens: int = 0  # longest student sequence kept
    teacher_tokens: int = 0  # teacher tokens kept (cross-tokenizer only)

    def count_bad(self, row: int, reason: str) -> None:
        self.bad_rows += 1
        if len(self.bad_examples) < MAX_BAD_EXAMPLES:
            self.bad_examples.append((row, reason))

    def add(self, sample: Sample) -> None:
        self.samples += 1
        n = len(sample.student.input_ids)
        self.tokens += n
        self.loss_tokens += len(sample.student.loss_positions)
        self.max_tokens = max(self.max_tokens, n)
        if sample.teacher is not None:
            self.teacher_tokens += len(sample.teacher.input_ids)


@dataclass
class DataReport:
    """What data preparation kept, cut and dropped; ``lines()`` / ``rich_table()`` print it, with
    the reasons of the first bad rows (``bad_row_lines()``)."""

    format: str = ""
    max_length: int = 0
    overlong_policy: str = ""
    cross_tokenizer: bool = False
    eval_from: str = ""  # "file", "split" or "none"
    train: SplitReport = field(default_factory=SplitReport)
    eval: SplitReport = field(default_factory=SplitReport)

    def lines(self) -> list[str]:
        out = [f"format {self.format}; max_length {self.max_length} ({self.overlong_policy}); "
               f"eval from {self.eval_from}; {'cross-tokenizer' if self.cross_tokenizer else 'shared tokenizer'}"]
        for name, s in (("train", self.train), ("eval", self.eval)):
            if not s.rows and not s.samples:
                continue
            mean = s.tokens / s.samples if s.samples else 0.0
            out.append(
                f"{name}: {s.samples} samples from {s.rows} rows of {s.source}; bad {s.bad_rows}; "
                f"overlong {s.overlong} (truncated {s.truncated}, dropped {s.dropped_overlong}); "
                f"tokens {s.tokens} (mean {mean:.1f}, max {s.max_tokens}), loss tokens {s.loss_tokens}"
                + (f", teacher tokens {s.teacher_tokens}" if self.cross_tokenizer else "")
            )
        return out + self.bad_row_lines()

    def bad_row_lines(self) -> list[str]:
        """Per split with bad rows: their count and source, then the first few, ``row N: reason``."""
        out = []
        for name, s in (("train", self.train), ("eval", self.eval)):
            if not s.bad_rows:
                continue
            shown = f"the first {len(s.bad_examples)}" if len(s.bad_examples) < s.bad_rows else "all"
            out.append(f"{name}: {s.bad_rows} bad row{'s' * (s.bad_rows != 1)} in {s.source} skipped "
                       f"({shown} below; rows count from 0)")
            out.extend(f"  row {row}: {reason}" for row, reason in s.bad_examples)
        return out

    def rich_table(self):
        from rich.table import Table
        from rich.text import Text

        bad = self.bad_row_lines()
        # Text, not a markup string: reasons quote data and templates, whose brackets rich would eat.
        t = Table(title=f"data ({self.format}, max_length {self.max_length}, {self.overlong_policy})",
                  caption=Text("\n".join(bad)) if bad else None, caption_justify="left")
        for col in ("split", "rows", "bad", "samples", "truncated", "dropped", "tokens", "loss tokens", "max len"):
            t.add_column(col, justify="right" if col != "split" else "left")
        for name, s in (("train", self.train), ("eval", self.eval)):
            t.add_row(name, str(s.rows), str(s.bad_rows), str(s.samples), str(s.truncated),
                      str(s.dropped_overlong), str(s.tokens), str(s.loss_tokens), str(s.max_tokens))
        return t

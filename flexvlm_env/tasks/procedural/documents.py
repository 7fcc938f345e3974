"""`doc_qa`: read one value from a small rendered document (a form or a table).

A form is a title and 3..8 "Label: value" lines (invoice number, dates, customer, amounts, item
count); a table lists 3..7 items with quantity and price. The question asks one value ("What is
the total?", "What is the price of pens?"). Text is small (font 8..22 px, shrunk until the
document fits the page) and documents are dense, so most requests need crops. The reference is
the value as printed, in lower case (one answer, ANLS). Amounts are consistent (total = subtotal
+ tax) and due dates follow issue dates, so a document reads like a real one. Dates print as ISO (2021-03-14), amounts with two decimals (52.10).
"""
from __future__ import annotations

from datetime import date, timedelta

import numpy as np
from PIL import Image, ImageDraw

from .layout import sample_image_size
from .references import Draft
from .render import draw_text_line, jitter_rgb, text_ink_size

CUSTOMERS = (
    "adams", "baker", "chen", "davis", "evans", "garcia", "green", "hall", "khan", "kim", "lee",
    "lopez", "martin", "miller", "moore", "nguyen", "patel", "reed", "rossi", "silva", "smith",
    "taylor", "turner", "walker", "white", "wilson", "young", "zhang",
)
ITEMS = (
    "apples", "pens", "paper", "cups", "plates", "bread", "milk", "eggs", "rice", "tea",
    "coffee", "soap", "towels", "chairs", "lamps", "books", "boxes", "tape", "glue", "nails",
    "bolts", "cables", "fans", "mugs", "socks", "hats", "gloves", "candles", "brushes", "forks",
)
TITLES = {"form": ("INVOICE", "RECEIPT", "BILL", "STATEMENT"), "table": ("ORDER", "PRICE LIST", "STOCK", "DELIVERY")}
FORM_QUESTIONS = {
    "Invoice No": "What is the invoice number?",
    "Date": "What is the date?",
    "Due Date": "What is the due date?",
    "Customer": "Who is the customer?",
    "Items": "How many items are there?",
    "Subtotal": "What is the subtotal?",
    "Tax": "What is the tax?",
    "Total": "What is the total?",
}
FIRST_DATE, LAST_ISSUE_DATE = date(2015, 1, 1), date(2025, 12, 31)
MAX_DUE_DAYS = 60
MAX_DOLLARS = 1200
MAX_QUANTITY = 30


def _amount(cents: int) -> str:
    return f"{cents // 100}.{cents % 100:02d}"


def _issue_date(rng: np.random.Generator) -> date:
    return FIRST_DATE + timedelta(days=int(rng.integers((LAST_ISSUE_DATE - FIRST_DATE).days + 1)))


def answer_vocabulary() -> list[str]:
    """Every value a document can print: amounts (5-cent steps), dates, invoice numbers, names, counts."""
    amounts = [_amount(cents) for cents in range(0, MAX_DOLLARS * 100, 5)]
    last_date = LAST_ISSUE_DATE + timedelta(days=MAX_DUE_DAYS)
    dates = [(FIRST_DATE + timedelta(days=d)).isoformat() for d in range((last_date - FIRST_DATE).days + 1)]
    invoice_numbers = [str(number) for number in range(1000, 10000)]
    counts = [str(count) for count in range(1, MAX_QUANTITY + 1)]
    return sorted(set(amounts) | set(dates) | set(invoice_numbers) | set(counts) | set(CUSTOMERS))


def _form(rng: np.random.Generator) -> tuple[list[tuple[str, str]], str, str]:
    """(label, value) lines in print order, and the question and answer."""
    subtotal_cents = int(rng.integers(100, 100_000)) // 5 * 5
    tax_cents = round(subtotal_cents * float(rng.uniform(0.05, 0.2)) / 5) * 5
    issued = _issue_date(rng)
    values = {
        "Invoice No": str(int(rng.integers(1000, 10000))),
        "Date": issued.isoformat(),
        "Due Date": (issued + timedelta(days=int(rng.integers(7, MAX_DUE_DAYS + 1)))).isoformat(),
        "Customer": CUSTOMERS[int(rng.integers(len(CUSTOMERS)))],
        "Items": str(int(rng.integers(1, MAX_QUANTITY + 1))),
        "Subtotal": _amount(subtotal_cents),
        "Tax": _amount(tax_cents),
        "Total": _amount(subtotal_cents + tax_cents),
    }
    labels = list(values)
    line_count = int(rng.integers(3, 9))
    kept = sorted(rng.choice(len(labels), size=line_count, replace=False))  # keep document order
    lines = [(labels[i], values[labels[i]]) for i in kept]
    label, value = lines[int(rng.integers(len(lines)))]
    # Names print capitalised; the reference is lower case (all references are).
    printed = [(name, v.capitalize() if name == "Customer" else v) for name, v in lines]
    return printed, FORM_QUESTIONS[label], value


def _table(rng: np.random.Generator) -> tuple[list[tuple[str, str, str]], str, str]:
    """Header and rows (item, qty, price), and the question and answer."""
    row_count = int(rng.integers(3, 8))
    items = [ITEMS[i] for i in rng.choice(len(ITEMS), size=row_count, replace=False)]
    rows = [(item, str(int(rng.integers(1, MAX_QUANTITY + 1))), _amount(int(rng.integers(20, 20_000)) // 5 * 5)) for item in items]
    item, quantity, price = rows[int(rng.integers(row_count))]
    if rng.random() < 0.5:
        return [("Item", "Qty", "Price"), *rows], f"What is the price of {item}?", price
    return [("Item", "Qty", "Price"), *rows], f"What is the quantity of {item}?", quantity


def generate(rng: np.random.Generator) -> Draft:
    size_wh = sample_image_size(rng)
    width, height = size_wh
    desk_rgb = jitter_rgb(rng, (120, 110, 100), amount=30)
    image = Image.new("RGB", size_wh, desk_rgb)
    draw = ImageDraw.Draw(image)
    margin_px = int(rng.integers(4, 21))
    paper = (margin_px, margin_px, width - margin_px, height - margin_px)
    draw.rectangle(paper, fill=jitter_rgb(rng, (250, 250, 245), amount=5))
    ink = jitter_rgb(rng, (25, 25, 35), amount=15)

    layout = "form" if rng.random() < 0.55 else "table"
    if layout == "form":
        lines, question, answer = _form(rng)
        rows = [(f"{label}:", value) for label, value in lines]
    else:
        rows, question, answer = _table(rng)
    titles = TITLES[layout]
    title = titles[int(rng.integers(len(titles)))]
    requested_font_px = int(rng.integers(8, 23))
    line_spacing = float(rng.uniform(1.35, 1.9))
    inner_w = paper[2] - paper[0] - 12
    inner_h = paper[3] - paper[1] - 12

    # Shrink the font until the document fits the page: the answer must always be printed.
    for font_size_px in range(requested_font_px, 5, -1):
        title_px = round(font_size_px * 1.5)
        column_gap_px = max(6, font_size_px)
        column_widths = [max(text_ink_size(row[c], font_size_px)[0] for row in rows) for c in range(len(rows[0]))]
        text_w = sum(column_widths) + column_gap_px * (len(column_widths) - 1)
        line_px = round(font_size_px * line_spacing)
        text_h = title_px * 2 + line_px * len(rows)
        if text_w <= inner_w and text_h <= inner_h and text_ink_size(title, title_px)[0] <= inner_w:
            break
    x0 = paper[0] + 6 + int(rng.integers(0, inner_w - text_w + 1))
    y = paper[1] + 6 + int(rng.integers(0, max(1, (inner_h - text_h) // 2 + 1)))
    draw_text_line(draw, title, (x0, y), title_px, ink)
    y += title_px * 2
    if layout == "table":
        draw.line([(x0, y - title_px // 2), (x0 + text_w, y - title_px // 2)], fill=ink, width=1)
    for row in rows:
        x = x0
        for text, column_w in zip(row, column_widths):
            draw_text_line(draw, text, (x, y), font_size_px, ink)
            x += column_w + column_gap_px
        y += line_px
    difficulty = {
        "image_width_px": width,
        "image_height_px": height,
        "layout": layout,
        "font_size_px": font_size_px,
        "text_height_px": text_ink_size(answer, font_size_px)[1],
        "line_count": len(rows),
        "line_spacing": round(line_spacing, 2),
    }
    return Draft(image, question, (answer,), difficulty)

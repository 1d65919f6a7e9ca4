"""The desktop app's look: one restrained palette, one font family, four sizes.

Kept in one place so the widgets never invent a colour or a size of their own.
"""

from __future__ import annotations

import tkinter as tk
from tkinter import font as tkfont
from tkinter import ttk

__all__ = ["COLORS", "Fonts", "apply_styles"]

COLORS = {
    "bg": "#F4F5F7",          # window background behind the chat
    "panel": "#FFFFFF",       # sidebar, header, compose bar
    "line": "#E3E6EB",        # hairlines between areas
    "text": "#1D2330",
    "muted": "#6B7383",
    "accent": "#3467D6",      # my bubbles, primary buttons, badges
    "accent_dark": "#2651B0",
    "accent_soft": "#E7EEFC", # the open conversation in the list
    "bubble_in": "#FFFFFF",
    "bubble_in_line": "#DDE1E8",
    "bubble_out_text": "#FFFFFF",
    "selected": "#F2B33D",    # outline of messages picked for deletion
    "danger": "#C93A3A",
    "danger_dark": "#A82E2E",
    "error_bg": "#FDECEC",
    "ok": "#2E9E5B",
    "warn": "#D49A1E",
    "scroll_trough": "#E8EAEE",       # a scrollbar's length: a shade apart from the "bg" it runs beside
    "scroll_thumb": "#C3C8D2",        # its handle
    "scroll_thumb_hover": "#A4ABB9",
    "scroll_thumb_pressed": "#8A93A3",
    "dialog_line": "#B4BBC7",         # a dialog's outline: it shows on the white sidebar and the grey chat alike
    "dialog_shadow": "#D3D7DF",       # and its shadow, below and to the right
}

_FAMILIES = ("Inter", "Cantarell", "Noto Sans", "DejaVu Sans", "Helvetica", "Arial")


class Fonts:
    """Named fonts: title, heading, body, small, plus bold body for names."""

    def __init__(self, root: tk.Misc):
        available = set(tkfont.families(root))
        family = next((f for f in _FAMILIES if f in available), tkfont.nametofont("TkDefaultFont").actual("family"))
        self.family = family
        self.title = tkfont.Font(root, family=family, size=20, weight="bold")
        self.heading = tkfont.Font(root, family=family, size=13, weight="bold")
        self.body = tkfont.Font(root, family=family, size=11)
        self.name = tkfont.Font(root, family=family, size=11, weight="bold")
        self.small = tkfont.Font(root, family=family, size=9)
        self.badge = tkfont.Font(root, family=family, size=9, weight="bold")
        for named in ("TkDefaultFont", "TkTextFont", "TkMenuFont"):
            tkfont.nametofont(named).configure(family=family, size=11)


def apply_styles(root: tk.Misc, fonts: Fonts):
    """ttk styles on the clam theme (flat, predictable on every platform)."""
    c = COLORS
    style = ttk.Style(root)
    style.theme_use("clam")
    root.configure(background=c["bg"])
    style.configure(".", background=c["bg"], foreground=c["text"], font=fonts.body,
                    bordercolor=c["line"], focuscolor=c["accent"])
    style.configure("TFrame", background=c["bg"])
    style.configure("Panel.TFrame", background=c["panel"])
    style.configure("Card.TFrame", background=c["panel"], relief="solid", borderwidth=1)
    style.configure("Dialog.TFrame", background=c["panel"], relief="solid", borderwidth=1,
                    bordercolor=c["dialog_line"], lightcolor=c["dialog_line"], darkcolor=c["dialog_line"])
    style.configure("TLabel", background=c["bg"], foreground=c["text"])
    style.configure("Panel.TLabel", background=c["panel"])
    style.configure("Title.TLabel", background=c["panel"], foreground=c["accent"], font=fonts.title)
    style.configure("Heading.TLabel", background=c["panel"], font=fonts.heading)
    style.configure("Muted.TLabel", background=c["panel"], foreground=c["muted"], font=fonts.small)
    style.configure("Field.TLabel", background=c["panel"], foreground=c["muted"], font=fonts.small)
    style.configure("Error.TLabel", background=c["error_bg"], foreground=c["danger"], font=fonts.body,
                    padding=(12, 8))
    style.configure("CardError.TLabel", background=c["panel"], foreground=c["danger"], font=fonts.small)
    style.configure("Status.TLabel", background=c["panel"], foreground=c["muted"], font=fonts.small,
                    padding=(6, 4))
    style.configure("Hint.TLabel", background=c["panel"], foreground=c["muted"], font=fonts.small)
    style.configure("TEntry", padding=(8, 6), fieldbackground=c["panel"], bordercolor=c["line"],
                    lightcolor=c["line"], darkcolor=c["line"])
    style.map("TEntry", bordercolor=[("focus", c["accent"])], lightcolor=[("focus", c["accent"])])
    button_line = "#C9CED8"     # a plain button's outline
    style.configure("TButton", padding=(12, 6), background=c["panel"], foreground=c["text"],
                    bordercolor=button_line, lightcolor=c["panel"], darkcolor=c["panel"], relief="solid")
    style.map("TButton", background=[("active", c["bg"]), ("disabled", c["panel"])],
              foreground=[("disabled", c["muted"])])
    for name, base, dark in (("Accent", c["accent"], c["accent_dark"]), ("Danger", c["danger"], c["danger_dark"])):
        style.configure(f"{name}.TButton", background=base, foreground="#FFFFFF", bordercolor=base,
                        lightcolor=base, darkcolor=base, font=fonts.name)
        # Greyed out, its outline greys too: a coloured ring round a grey button reads as the keyboard focus.
        edge = [("disabled", c["line"]), ("active", dark)]
        style.map(f"{name}.TButton", background=[("active", dark), ("disabled", c["line"])],
                  bordercolor=[("disabled", button_line), ("active", dark)], lightcolor=edge, darkcolor=edge)
    style.configure("Link.TButton", background=c["panel"], foreground=c["accent"], bordercolor=c["panel"],
                    lightcolor=c["panel"], darkcolor=c["panel"], padding=(6, 4))
    style.map("Link.TButton", background=[("active", c["accent_soft"])])
    # Scrollbars: a grey handle (its border the trough's, so it sits inset) on
    # a light trough, darker under the pointer and while dragged. The trough
    # is a shade apart from the conversation's "bg" too, or the bar's length
    # would not show beside it. No arrows: clam draws them in the handle's
    # colour, where they would read as more handle. With nothing to scroll,
    # ttk disables the bar and its full-length handle takes the trough's
    # colour: only the trough shows.
    style.layout("Vertical.TScrollbar", [("Vertical.Scrollbar.trough", {"sticky": "ns", "children": [
        ("Vertical.Scrollbar.thumb", {"sticky": "nswe", "expand": "1"})]})])
    thumb, trough = c["scroll_thumb"], c["scroll_trough"]
    style.configure("Vertical.TScrollbar", background=thumb, troughcolor=trough, bordercolor=trough,
                    lightcolor=thumb, darkcolor=thumb, arrowcolor=c["muted"], gripcount=0)
    shades = [("disabled", trough), ("pressed", c["scroll_thumb_pressed"]), ("active", c["scroll_thumb_hover"])]
    style.map("Vertical.TScrollbar", background=shades, lightcolor=shades, darkcolor=shades)
    style.configure("Panel.TMenubutton", background=c["panel"], foreground=c["text"], padding=(8, 4),
                    bordercolor=c["panel"], lightcolor=c["panel"], darkcolor=c["panel"], arrowcolor=c["muted"])
    return style

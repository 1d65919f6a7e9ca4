"""``paxchat-gui``: the Tk desktop app, run inside the Twisted reactor.

The widgets only draw ``gui_model.ChatModel`` and pass clicks and keys to
``gui_controller.ChatController``; redraws are coalesced to one per reactor
turn, so a burst of incoming messages never freezes the window. Tk runs in
the reactor through ``twisted.internet.tksupport`` (installed in ``main``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tkinter as tk
from tkinter import ttk
from typing import Callable

from twisted.logger import Logger

from .gui_controller import ChatController
from .gui_model import ChatModel, Coalescer
from .gui_theme import COLORS, Fonts, apply_styles

__all__ = ["ChatApp", "main"]

# The smallest window the app allows (``minsize``): the login card, creating
# an account with a two-line error under it, fits in it without scrolling,
# and so does the narrowest delete question beside a peer's name.
MIN_WIDTH, MIN_HEIGHT = 720, 480
CARD_MARGIN = 12         # at least this much room above and below the login card
ROW_HEIGHT = 66
SIDEBAR_WIDTH = 290
HEADER_PAD_X = 20        # the conversation header's padding, left and right
HEADER_GAP = 16          # between the peer's name and the delete controls
ERROR_SECONDS = 8.0      # how long an error banner stays, unless it is a send's (kept until dismissed)
CONTROLS_INSET = 20      # the delete controls' distance from the header's right padding
# On a narrow window the delete question gets shorter before the peer's name
# is cut below this width: it asks about that peer's messages. Its shortest
# form stays, though, and the name makes room for it.
NAME_KEPT_WIDTH = 120
# A key pressed with Control or Alt held is a shortcut, not a move in a list: Control,
# Mod1 (Alt from an X11 keyboard) and Tk's own Alt bit (Windows, and generated events).
MODIFIERS = 0x0004 | 0x0008 | 0x20000
# The Delete account dialog: this wide, or as the window allows less its
# margins; over the conversation, or across the window where the
# conversation is too narrow for it; it hangs a little above the middle,
# never nearer the edges than the margin, and with room below for its error.
DIALOG_WIDTH = 420
DIALOG_MARGIN = 24
DIALOG_PAD = (28, 24)
DIALOG_SHADOW = 4


def rounded_rect(canvas, x0, y0, x1, y1, r, **kw):
    """A rounded rectangle as one smoothed polygon (Tk has none built in)."""
    r = min(r, (x1 - x0) / 2, (y1 - y0) / 2)
    points = [x0 + r, y0, x1 - r, y0, x1, y0, x1, y0 + r, x1, y1 - r, x1, y1,
              x1 - r, y1, x0 + r, y1, x0, y1, x0, y1 - r, x0, y0 + r, x0, y0]
    return canvas.create_polygon(points, smooth=True, **kw)


def _hung_top(area, height, room, margin):
    """Where a panel ``height`` pixels tall hangs by its top in an ``area``
    pixels tall: centred a little above the middle, so that what grows it
    (an error, a field) grows it downward and nothing moves under the
    pointer; higher on a short area, to leave ``room`` for its tallest
    self; never nearer the edges than ``margin``."""
    return max(margin, min(round(0.45 * area - height / 2), area - room - margin))


class ChatApp:
    """The window: a login screen, then conversations on the left and one open on the right."""

    log = Logger()

    def __init__(self, root: tk.Tk, reactor, make_client: Callable, on_closed: Callable[[], None] | None = None):
        self.root = root
        self.reactor = reactor
        self.on_closed = on_closed
        self.fonts = Fonts(root)
        apply_styles(root, self.fonts)
        root.title("paxchat")
        root.geometry("1000x680")
        root.minsize(MIN_WIDTH, MIN_HEIGHT)
        self.coalescer = Coalescer(reactor.callLater, self.redraw)
        self.model = ChatModel(on_change=self.coalescer.notify)
        self._closing = False
        self._list_rows: list[tuple[int, int, str]] = []
        self._list_cursor_seen = None        # the keys' row in the sidebar when it was last scrolled into view
        self._last_drawn = (None, None, 0)   # (peer, oldest id, height) of the last conversation drawing
        self._at_bottom = True               # the conversation is scrolled to its newest message
        self._session = None                 # the model's session the boxes were last emptied for
        self._view_check = None              # a pending look at whether the newest messages are seen
        self._login_error_shown = None       # (error, what about) the login fields were last set for
        self._danger_error_shown = None      # the error the Delete account dialog last showed
        self._build()
        root.protocol("WM_DELETE_WINDOW", self.close)
        self.controller = ChatController(reactor, self.model, make_client)
        self.redraw({"screen", "status", "error", "list", "conversation", "search"})
        self.controller.start()

    # -- building ------------------------------------------------------------------

    def _build(self):
        self.outer = ttk.Frame(self.root)
        self.outer.pack(fill="both", expand=True)
        self.status_bar = ttk.Frame(self.root, style="Panel.TFrame")
        self.status_bar.pack(side="bottom", fill="x", before=self.outer)
        tk.Frame(self.root, height=1, background=COLORS["line"]).pack(side="bottom", fill="x", before=self.status_bar)
        self.status_dot = tk.Canvas(self.status_bar, width=10, height=10, highlightthickness=0,
                                    background=COLORS["panel"])
        self.status_dot.pack(side="left", padx=(12, 0))
        self.status_label = ttk.Label(self.status_bar, style="Status.TLabel", text="")
        self.status_label.pack(side="left")
        self._build_login()
        self._build_main()
        self._select_all_keys()

    def _build_login(self):
        self.login = ttk.Frame(self.outer)
        # The card lies on a canvas, which scrolls should a long error make it
        # taller than a short window (its scrollbar shows only then).
        self.login_canvas = tk.Canvas(self.login, background=COLORS["bg"], highlightthickness=0, borderwidth=0)
        self.login_scroll = ttk.Scrollbar(self.login, orient="vertical", command=self.login_canvas.yview)
        self.login_canvas.configure(yscrollcommand=self.login_scroll.set)
        self.login_canvas.pack(side="left", fill="both", expand=True)
        card = ttk.Frame(self.login_canvas, style="Panel.TFrame", padding=(36, 24))
        self.login_card = card
        ttk.Label(card, text="paxchat", style="Title.TLabel").pack(anchor="w")
        ttk.Label(card, text="Chat that keeps going when servers fail.", style="Muted.TLabel").pack(
            anchor="w", pady=(2, 16))
        ttk.Label(card, text="Username", style="Field.TLabel").pack(anchor="w")
        self.user_entry = ttk.Entry(card, width=32, font=self.fonts.body)
        self.user_entry.pack(fill="x", pady=(4, 12))
        ttk.Label(card, text="Password", style="Field.TLabel").pack(anchor="w")
        self.password_entry = ttk.Entry(card, width=32, show="•", font=self.fonts.body)
        self.password_entry.pack(fill="x", pady=(4, 8))
        # Creating an account, the password is typed twice: there is no reset.
        # Shown only then, under the first; made here so Tab reaches it before the buttons.
        self.repeat_row = ttk.Frame(card, style="Panel.TFrame")
        ttk.Label(self.repeat_row, text="Repeat password", style="Field.TLabel").pack(anchor="w", pady=(4, 0))
        self.repeat_entry = ttk.Entry(self.repeat_row, width=32, show="•", font=self.fonts.body)
        self.repeat_entry.pack(fill="x", pady=(4, 8))
        self.login_error = ttk.Label(card, text="", style="CardError.TLabel", wraplength=300, justify="left")
        self.login_error.pack(anchor="w", fill="x", pady=(0, 8))
        buttons = ttk.Frame(card, style="Panel.TFrame")
        buttons.pack(fill="x", pady=(4, 0))
        self.login_button = ttk.Button(buttons, text="Log in", style="Accent.TButton", command=self._log_in)
        self.login_button.pack(side="left", fill="x", expand=True)
        self.create_button = ttk.Button(buttons, text="Create account", command=self._create_account)
        self.create_button.pack(side="left", padx=(10, 0))
        # Why the login screen is back ("You are logged out."): under the buttons, and only then.
        self.login_notice = ttk.Label(card, text="", style="Muted.TLabel", wraplength=300)
        # Its heights logging in, and creating an account with a two-line
        # error (the tallest it is but for a long network error): see _place_card.
        card.update_idletasks()
        self._card_height = card.winfo_reqheight()
        self.repeat_row.pack(fill="x", after=self.password_entry)
        self.login_error.configure(text="\n")
        card.update_idletasks()
        self._card_room = card.winfo_reqheight()
        self.login_error.configure(text="")
        self.repeat_row.pack_forget()
        self._card_item = self.login_canvas.create_window(0, 0, window=card, anchor="n")
        self.login_canvas.bind("<Configure>", self._place_card)
        card.bind("<Configure>", self._place_card)
        self._wheel(self.login_canvas, self.login_canvas.yview)
        widgets = [card]
        while widgets:
            widget = widgets.pop()
            widgets.extend(widget.winfo_children())
            self._wheel(widget, self.login_canvas.yview)
            if isinstance(widget, (ttk.Entry, ttk.Button)):
                widget.bind("<FocusIn>", lambda e: self._login_see(e.widget), add=True)
        self.user_entry.bind("<Return>", lambda e: self.password_entry.focus_set())
        self.password_entry.bind("<Return>", lambda e: self._password_return())
        self.repeat_entry.bind("<Return>", lambda e: self._create_account())
        for entry in (self.user_entry, self.password_entry, self.repeat_entry):
            entry.bind("<Escape>", lambda e: self.model.set_creating(False))

    def _place_card(self, event=None):
        """Hang the login card by its top where, logging in, it is centred (a
        little above the middle): the repeat field (or a longer error) then
        grows it downward, and nothing moves up from under the pointer
        between two clicks on Create account. On a short window it hangs
        higher, so that creating an account with an error still fits; taller
        than the window (a long error), it scrolls."""
        canvas, card = self.login_canvas, self.login_card
        width, height = canvas.winfo_width(), canvas.winfo_height()
        top = _hung_top(height, self._card_height, self._card_room, CARD_MARGIN)
        canvas.coords(self._card_item, width // 2, top)
        bottom = top + card.winfo_reqheight() + CARD_MARGIN
        canvas.configure(scrollregion=(0, 0, width, max(bottom, height)))
        if bottom > height and not self.login_scroll.winfo_manager():
            self.login_scroll.pack(side="right", fill="y", before=canvas)
        elif bottom <= height and self.login_scroll.winfo_manager():
            self.login_scroll.pack_forget()
            canvas.yview_moveto(0.0)

    def _login_see(self, widget):
        """Scrolled, the login card brings the field or button with the cursor into view."""
        canvas = self.login_canvas
        if not self.login_scroll.winfo_manager():
            return
        top = widget.winfo_rooty() - canvas.winfo_rooty()
        bottom = top + widget.winfo_height()
        if top >= 0 and bottom <= canvas.winfo_height():
            return
        total = float(canvas.cget("scrollregion").split()[3])
        y = canvas.canvasy(top if top < 0 else bottom - canvas.winfo_height())
        canvas.yview_moveto(max(0.0, y + (-CARD_MARGIN if top < 0 else CARD_MARGIN)) / total)

    def _build_main(self):
        c = COLORS
        self.main = ttk.Frame(self.outer)
        self.main.columnconfigure(2, weight=1)
        self.main.rowconfigure(0, weight=1)

        # Sidebar: who I am, search, conversations.
        side = ttk.Frame(self.main, style="Panel.TFrame", width=SIDEBAR_WIDTH)
        side.grid(row=0, column=0, sticky="nsew")
        side.grid_propagate(False)
        side.columnconfigure(0, weight=1)
        side.rowconfigure(2, weight=1)
        tk.Frame(self.main, width=1, background=c["line"]).grid(row=0, column=1, sticky="ns")
        head = ttk.Frame(side, style="Panel.TFrame", padding=(16, 14, 10, 8))
        head.grid(row=0, column=0, sticky="ew")
        self.me_label = ttk.Label(head, text="", style="Heading.TLabel")
        self.me_label.pack(side="left")
        self.menu_button = tk.Menubutton(head, text="Account ▾", relief="flat", indicatoron=False,
                                         background=c["panel"], activebackground=c["accent_soft"],
                                         foreground=c["muted"], activeforeground=c["text"], font=self.fonts.small,
                                         borderwidth=0, highlightthickness=0, padx=8, pady=4, cursor="hand2")
        menu = tk.Menu(self.menu_button, tearoff=False, font=self.fonts.body, background=c["panel"],
                       activebackground=c["accent_soft"], activeforeground=c["text"], relief="flat")
        menu.add_command(label="Log out", command=self._log_out)
        # On: whoever sent you a message sees "Read" once you have, and you see theirs.
        self.read_receipts = tk.BooleanVar(self.root, value=True)
        menu.add_checkbutton(label="Read receipts", variable=self.read_receipts,
                             command=self._toggle_read_receipts, state="disabled")
        menu.add_separator()
        menu.add_command(label="Delete account…", command=self._ask_delete_account, foreground=c["danger"])
        self.menu_button["menu"] = menu
        self.account_menu = menu
        self.menu_button.pack(side="right")
        search = ttk.Frame(side, style="Panel.TFrame", padding=(12, 0, 12, 10))
        search.grid(row=1, column=0, sticky="ew")
        self.search_text = tk.StringVar(self.root)
        self.search_entry = ttk.Entry(search, font=self.fonts.body, textvariable=self.search_text)
        self.search_entry.pack(fill="x")
        self.search_hint = self._hint(self.search_entry, self.search_text, "Find people  (al, a*, b?b)")
        # Edited: the results (or error) of what it held before no longer answer it.
        self.search_text.trace_add("write", lambda *_: self.controller.search_edited())
        # Why a search was refused or failed: under the box, where the user typed.
        self.search_error = ttk.Label(search, text="", style="CardError.TLabel", wraplength=SIDEBAR_WIDTH - 28,
                                      justify="left")
        self.search_entry.bind("<Return>", lambda e: self._search())
        self.search_entry.bind("<Escape>", lambda e: self._clear_search())
        self.search_entry.bind("<Down>", self._enter_list)
        lists = ttk.Frame(side, style="Panel.TFrame")
        lists.grid(row=2, column=0, sticky="nsew")
        # Reached with Down from Find people, not with Tab: Tab goes on as it did.
        self.list_canvas = tk.Canvas(lists, background=c["panel"], highlightthickness=0, borderwidth=0,
                                     takefocus=0)
        self.list_scroll = ttk.Scrollbar(lists, orient="vertical", command=self.list_canvas.yview)
        self.list_canvas.configure(yscrollcommand=self.list_scroll.set)
        # The scrollbar is packed first: in the fixed-width sidebar the canvas would squeeze it to nothing.
        self.list_scroll.pack(side="right", fill="y")
        self.list_canvas.pack(side="left", fill="both", expand=True)
        self.list_canvas.bind("<Button-1>", self._list_clicked)
        self.list_canvas.bind("<Configure>", lambda e: self.coalescer.notify({"list", "search"}))
        self._wheel(self.list_canvas, self.list_canvas.yview)
        self._list_keys()

        # Chat: header, error banner, messages, compose.
        chat = ttk.Frame(self.main)
        chat.grid(row=0, column=2, sticky="nsew")
        chat.columnconfigure(0, weight=1)
        chat.rowconfigure(2, weight=1)
        self.chat = chat
        header = ttk.Frame(chat, style="Panel.TFrame", padding=(HEADER_PAD_X, 12))
        header.grid(row=0, column=0, sticky="ew")
        self.peer_label = ttk.Label(header, text="", style="Heading.TLabel")
        self.peer_label.pack(side="left")
        self.delete_button = ttk.Button(header, text="Delete", style="Danger.TButton",
                                        command=self.model.ask_delete)
        # Deleting cannot be undone: asked in the header, not in a dialog with its own event loop.
        self.confirm_bar = ttk.Frame(header, style="Panel.TFrame")
        self.confirm_label = ttk.Label(self.confirm_bar, text="", style="Panel.TLabel")
        self.confirm_label.pack(side="left", padx=(0, 10))
        # Buttons as wide as their words: the header is shared with the peer's name.
        self.confirm_delete_button = ttk.Button(self.confirm_bar, text="Delete", style="Danger.TButton",
                                                width=0, command=self.controller_delete_selected)
        self.confirm_delete_button.pack(side="left")
        self.confirm_cancel_button = ttk.Button(self.confirm_bar, text="Cancel", width=0,
                                                command=self.model.cancel_delete)
        self.confirm_cancel_button.pack(side="left", padx=(8, 0))
        tk.Frame(chat, height=1, background=c["line"]).grid(row=0, column=0, sticky="sew")
        self.error_row = tk.Frame(chat, background=c["error_bg"])
        self.error_banner = ttk.Label(self.error_row, text="", style="Error.TLabel", wraplength=600)
        self.error_banner.pack(side="left", fill="x", expand=True)
        self.error_close = tk.Label(self.error_row, text="✕", background=c["error_bg"], foreground=c["danger"],
                                    font=self.fonts.body, padx=14, cursor="hand2")
        self.error_close.pack(side="right", fill="y")
        self.error_close.bind("<Button-1>", lambda e: self.model.clear_error())
        body = ttk.Frame(chat)
        body.grid(row=2, column=0, sticky="nsew")
        self.canvas = tk.Canvas(body, background=c["bg"], highlightthickness=0, borderwidth=0)
        scroll = ttk.Scrollbar(body, orient="vertical", command=self._scroll_chat)
        self.canvas.configure(yscrollcommand=lambda a, b: (scroll.set(a, b), self._scrolled(a, b)))
        scroll.pack(side="right", fill="y")
        self.canvas.pack(side="left", fill="both", expand=True)
        # Over the conversation's bottom while messages came that the reader,
        # scrolled up, has not seen (they stay unread till then); a click goes down to them.
        self.unseen_cue = tk.Label(body, text="", font=self.fonts.badge, background=c["accent"],
                                   foreground="#FFFFFF", padx=12, pady=4, cursor="hand2")
        self.unseen_cue.bind("<Button-1>", lambda e: self._to_newest())
        # Minimised or in the background, the window shows nothing read.
        for sequence in ("<FocusIn>", "<FocusOut>", "<Map>", "<Unmap>"):
            self.root.bind(sequence, self._window_changed, add="+")
        self.canvas.bind("<Configure>", lambda e: self.coalescer.notify({"conversation"}))
        self.canvas.tag_bind("bubble", "<Button-1>", self._bubble_clicked)
        self.canvas.bind("<Button-1>", lambda e: self.canvas.focus_set())  # for the keys below
        self._wheel(self.canvas, self._scroll_chat)
        for key, args in (("<Prior>", ("scroll", -1, "pages")), ("<Next>", ("scroll", 1, "pages")),
                          ("<Home>", ("moveto", 0.0)), ("<End>", ("moveto", 1.0))):
            self.root.bind(key, lambda e, args=args: self._key_scroll(e, *args))
        self.root.bind("<Alt-Up>", lambda e: self._key_conversation(-1))
        self.root.bind("<Alt-Down>", lambda e: self._key_conversation(1))
        self.root.bind("<Delete>", lambda e: self._key_delete(e, self.model.ask_delete))
        self.root.bind("<Escape>", lambda e: self._key_delete(e, self.model.cancel_delete))
        # Ctrl+C (and the platform's other copy keys): the selected messages' text.
        self.root.bind("<<Copy>>", self._key_copy)
        self.bubble_menu = tk.Menu(self.canvas, tearoff=False, font=self.fonts.body, background=c["panel"],
                                   activebackground=c["accent_soft"], activeforeground=c["text"], relief="flat")
        self.bubble_menu.add_command(label="Copy", command=lambda: self._copy(self._menu_message))
        self._menu_message = None
        right = "<Button-2>" if self.root.tk.call("tk", "windowingsystem") == "aqua" else "<Button-3>"
        self.canvas.tag_bind("bubble", right, self._bubble_menu)

        compose = ttk.Frame(chat, style="Panel.TFrame", padding=(16, 10, 16, 8))
        compose.grid(row=3, column=0, sticky="ew")
        tk.Frame(chat, height=1, background=c["line"]).grid(row=3, column=0, sticky="new")
        compose.columnconfigure(0, weight=1)
        self.compose = tk.Text(compose, height=2, wrap="word", font=self.fonts.body, relief="flat",
                               background=c["bg"], foreground=c["text"], insertbackground=c["text"],
                               highlightthickness=1, highlightbackground=c["line"], highlightcolor=c["accent"],
                               padx=10, pady=8, undo=True)
        self.compose.grid(row=0, column=0, sticky="ew")
        self.send_button = ttk.Button(compose, text="Send", style="Accent.TButton", command=self._send)
        self.send_button.grid(row=0, column=1, sticky="s", padx=(10, 0))
        self.compose_hint = ttk.Label(
            compose, text="Enter to send · Shift+Enter: new line · Alt+↑/↓: switch chat · click to select · "
                          "Ctrl+C: copy",
            style="Hint.TLabel")
        self.compose_hint.grid(row=1, column=0, columnspan=2, sticky="w", pady=(6, 0))
        # On a narrow window the hint wraps instead of being cut off at the right.
        compose.bind("<Configure>", lambda e: self.compose_hint.configure(wraplength=max(e.width - 32, 100)))
        self.compose.bind("<Return>", self._compose_return)
        self.compose.bind("<KP_Enter>", self._compose_return)
        self.compose.bind("<Shift-Return>", self._compose_newline)
        self.compose.bind("<<Modified>>", self._compose_modified)

        # Asking for the password before deleting the account: a dialog over
        # the whole window (it holds all of it), outlined, with a shadow.
        self.danger_shadow = tk.Frame(self.main, background=c["dialog_shadow"])
        self.danger = ttk.Frame(self.main, style="Dialog.TFrame", padding=DIALOG_PAD)
        ttk.Label(self.danger, text="Delete your account?", style="Heading.TLabel").pack(anchor="w")
        self.danger_text = ttk.Label(self.danger, text="", style="Muted.TLabel", justify="left")
        self.danger_text.pack(anchor="w", pady=(6, 14))
        ttk.Label(self.danger, text="Password", style="Field.TLabel").pack(anchor="w")
        self.danger_password = ttk.Entry(self.danger, show="•", width=20, font=self.fonts.body)
        self.danger_password.pack(fill="x", pady=(4, 16))
        # Why the last try failed ("That password is wrong."): here, not in the banner behind.
        self.danger_error = ttk.Label(self.danger, text="", style="CardError.TLabel", justify="left")
        row = ttk.Frame(self.danger, style="Panel.TFrame")
        row.pack(fill="x")
        ttk.Button(row, text="Cancel", command=self._hide_danger).pack(side="right")
        self.danger_button = ttk.Button(row, text="Delete account", style="Danger.TButton",
                                        command=self._delete_account)
        self.danger_button.pack(side="right", padx=(0, 10))
        self.danger_password.bind("<Return>", lambda e: self._delete_account())
        self.danger_password.bind("<Escape>", lambda e: self._hide_danger())
        self.main.bind("<Configure>", lambda e: self.danger.winfo_manager() and self._place_danger())
        # The shadow follows the dialog's size (an error under the password makes it taller).
        self.danger.bind("<Configure>", lambda e: self.danger_shadow.winfo_manager() and
                         self.danger_shadow.place_configure(width=e.width, height=e.height))

    def _list_keys(self):
        """The sidebar's list from the keyboard, as in desktop chat apps: Up and
        Down (a page with Page Up/Down, the ends with Home/End) move a marked
        row, Enter opens it, Esc goes back to Find people and closes the
        search, and so does Up from the first row, without closing it. A
        letter typed here goes on into Find people. Each returns "break",
        so the window's own bindings (scrolling the conversation, Esc
        taking back a delete question) do not act as well."""
        canvas = self.list_canvas

        def plain(handler):
            # With Alt or Control held the key is the window's (Alt+Up/Down switch conversations).
            return lambda e: None if e.state & MODIFIERS else handler()

        def page():
            return max(1, canvas.winfo_height() // ROW_HEIGHT)
        for key, handler in (("<Up>", lambda: self._list_step(-1)), ("<Down>", lambda: self._list_step(1)),
                             ("<Prior>", lambda: self._list_step(-page(), leave=False)),
                             ("<Next>", lambda: self._list_step(page())),
                             ("<Home>", lambda: self._list_end(False)), ("<End>", lambda: self._list_end(True))):
            canvas.bind(key, plain(handler))
        canvas.bind("<Return>", lambda e: self._list_open())
        canvas.bind("<KP_Enter>", lambda e: self._list_open())
        canvas.bind("<Escape>", lambda e: self._clear_search() or "break")
        canvas.bind("<Key>", self._list_typed)
        canvas.bind("<FocusOut>", self._list_focus_out)

    def _enter_list(self, event):
        """Down in Find people: the keys go to the sidebar's first row, if it has one."""
        if event.state & MODIFIERS:
            return None      # Alt+Down: the window's
        if self.model.enter_list():
            self.list_canvas.focus_set()
        return "break"

    def _list_step(self, step, leave=True):
        """Up/Down in the sidebar's list; Up on its first row goes back to Find people."""
        if not self.model.move_list_cursor(step, leave):
            self.search_entry.focus_set()
        return "break"

    def _list_end(self, last):
        self.model.list_cursor_to_end(last)
        return "break"

    def _list_open(self):
        """Enter on the marked row: its conversation opens, and the keys go to its compose box."""
        peer = self.model.list_cursor
        if peer is not None and peer in self.model.list_peers():
            self.open_conversation(peer)
        return "break"

    def _list_typed(self, event):
        """A letter typed in the list is meant for Find people: it goes there, and so do the keys."""
        if event.state & MODIFIERS or not event.char or not event.char.isprintable():
            return None      # Tab, Alt+Up... : the window's, as elsewhere
        self.model.leave_list()
        self.search_entry.focus_set()
        self.search_entry.insert("end", event.char)
        self.search_entry.icursor("end")
        return "break"

    def _list_focus_out(self, event):
        """The keys went to another part of the window (a click, Tab, a dialog):
        no row is theirs any more. Not when the whole window lost the focus:
        coming back, they are where they were."""
        try:
            focus = str(self.root.tk.call("focus"))
        except tk.TclError:
            return
        if focus and focus != str(self.list_canvas):
            self.model.leave_list()

    def _select_all_keys(self):
        """Ctrl+A selects all the text of a box, as desktop apps do (and Tk on
        Windows). Tk on X11 keeps the Emacs meaning, the start of the line;
        Home still goes there. On macOS Cmd+A selects all already."""
        if self.root.tk.call("tk", "windowingsystem") == "x11":
            keys = ("<Control-Key-a>", "<Control-Lock-Key-A>")
            self.root.event_delete("<<LineStart>>", *keys)
            self.root.event_add("<<SelectAll>>", *keys)

    def _hint(self, entry, variable, text):
        """Grey hint text over ``entry`` while it is empty, with the cursor in it
        or not (as modern apps show one): gone at the first key, back once
        emptied. A label laid over the box, never the box's text, so the
        hint is never searched for, selected or edited."""
        hint = tk.Label(entry, text=text, font=self.fonts.body, foreground=COLORS["muted"],
                        background=COLORS["panel"], borderwidth=0, padx=0, pady=0, cursor="xterm")
        # A click on it is a click in the box (the hint lies where the text would),
        # and so is a middle click, which pastes the X selection there.
        hint.bind("<Button-1>", lambda e: (entry.focus_set(), entry.icursor("end")))

        def paste(_):
            try:
                text = entry.selection_get()          # PRIMARY: what is selected anywhere
            except tk.TclError:
                return
            entry.focus_set()
            entry.insert("end", text)
        hint.bind("<ButtonRelease-2>", paste)

        def show(*_):
            if variable.get():
                hint.place_forget()
            elif not hint.winfo_manager():
                # Where typed text begins, and a little after, not to hide the blinking cursor.
                left = int(str(ttk.Style(entry).lookup("TEntry", "padding")[0])) + 3
                hint.place(x=left, rely=0.5, anchor="w")
        variable.trace_add("write", show)
        show()
        return hint

    def _wheel(self, widget, yview):
        widget.bind("<MouseWheel>", lambda e: yview("scroll", -1 if e.delta > 0 else 1, "units"))
        widget.bind("<Button-4>", lambda e: yview("scroll", -3, "units"))
        widget.bind("<Button-5>", lambda e: yview("scroll", 3, "units"))

    def _scroll_chat(self, *args):
        """The reader scrolls the conversation: note whether it is left at the bottom.

        Noted here, not read from the view when drawing, because by then a
        resize has already moved the bottom out of view."""
        self.canvas.yview(*args)
        self._at_bottom = self.canvas.yview()[1] >= 0.999
        self._draw_unseen_cue()
        self._check_in_view()

    def _to_newest(self):
        self._scroll_chat("moveto", 1.0)

    def _window_seen(self) -> bool:
        """The window is on screen and has the keyboard (not minimised, not behind another)."""
        try:
            return self.root.state() not in ("iconic", "withdrawn") and str(self.root.tk.call("focus")) != ""
        except tk.TclError:
            return False

    def _window_changed(self, event):
        """Focus or mapping changed: look again once the events of this turn are in."""
        if event.type in (tk.EventType.Map, tk.EventType.Unmap) and event.widget is not self.root:
            return
        if self._view_check is None and not self._closing:
            self._view_check = self.reactor.callLater(0, self._check_in_view)

    def _check_in_view(self):
        """Tell the controller whether the open conversation's newest messages are seen:
        what came while they were not is marked read once they are."""
        self._view_check = None
        if self._closing or self.model.screen != "chats" or self.model.open_peer is None:
            return
        self.controller.newest_in_view(self._at_bottom and self._window_seen())

    def _draw_unseen_cue(self):
        text = self.model.unseen_cue if self.model.open_peer is not None and not self._at_bottom else ""
        if text:
            self.unseen_cue.configure(text=text)
            self.unseen_cue.place(relx=0.5, rely=1.0, y=-14, anchor="s")
            self.unseen_cue.lift()
        else:
            self.unseen_cue.place_forget()

    def _typing(self, event) -> bool:
        """The key went to a text entry, where it edits the text."""
        return isinstance(event.widget, (tk.Entry, tk.Text))

    def _key_scroll(self, event, *args):
        """Page Up/Down, Home/End scroll the open conversation when not typing.

        As with the mouse: End (or reaching the bottom) follows new messages
        again, and Page Up at the top loads older ones."""
        if self._typing(event) or self.model.screen != "chats" or self.model.open_peer is None:
            return None
        self._scroll_chat(*args)
        self._scrolled(*self.canvas.yview())
        return "break"

    def _key_copy(self, event):
        """Ctrl+C outside a text box copies the selected messages (a text box copies its own selection)."""
        if self._typing(event) or self.model.screen != "chats" or not self.model.selected:
            return None
        self._copy()
        return "break"

    def _copy(self, message_id=None):
        text = self.model.selected_text(message_id)
        if text:
            self.root.clipboard_clear()
            self.root.clipboard_append(text)

    def _bubble_menu(self, event):
        """Right-click on a message: Copy (the selected messages, if it is one of them)."""
        self._menu_message = self._message_at_pointer()
        if self._menu_message is not None:
            self.bubble_menu.tk_popup(event.x_root, event.y_root)

    def _message_at_pointer(self):
        item = self.canvas.find_withtag("current")
        for tag in self.canvas.gettags(item[0]) if item else ():
            if tag.startswith("msg") and tag[3:].isdigit():
                return int(tag[3:])
        return None

    def _key_delete(self, event, action):
        """Delete asks to delete the selected messages, Escape takes the question back, when not typing."""
        if self._typing(event) or self.model.screen != "chats" or not self.model.selected:
            return None
        action()
        return "break"

    # -- actions ----------------------------------------------------------------------

    # The password stays in its field until the answer: a refused name keeps
    # it (``_draw_error``), and a session begun empties it (``_forget_typed``).
    def _log_in(self):
        self._login_error_shown = None      # its answer points at its field, even if it is the last one's
        self.model.set_creating(False)
        self.controller.log_in(self.user_entry.get(), self.password_entry.get())

    def _password_return(self):
        """Enter in the password field: logs in, or, creating an account, goes to the repeat field."""
        if self.model.creating_account:
            self.repeat_entry.focus_set()
        else:
            self._log_in()

    def _create_account(self):
        """The first click shows the repeat field (and puts the cursor in the first
        empty field); the next creates the account."""
        if not self.model.creating_account:
            self.model.set_creating(True)
            self._draw_login_mode()     # now: the cursor goes to the field shown
            empty = [e for e in (self.user_entry, self.password_entry, self.repeat_entry) if not e.get()]
            (empty[0] if empty else self.repeat_entry).focus_set()
            return
        self._login_error_shown = None
        self.controller.create_account(self.user_entry.get(), self.password_entry.get(), self.repeat_entry.get())

    def _log_out(self):
        self.controller.log_out()

    def _toggle_read_receipts(self):
        self.controller.set_read_receipts(self.read_receipts.get())

    def _ask_delete_account(self):
        self.danger_text.configure(
            text=f"This removes {self.model.me} and every message sent to it, on every server. "
                 "It cannot be undone. Enter your password to confirm.")
        self.danger_password.delete(0, "end")
        self._clear_danger_error()
        self._place_danger()
        self.danger_password.focus_set()
        # Modal: until it is answered, the rest of the window takes no clicks
        # or keys (a send or a chat switch behind it would be a surprise).
        try:
            self.danger.update_idletasks()
            self.danger.grab_set()
        except tk.TclError:
            pass  # not viewable (the window is withdrawn): nothing else to click either

    def _place_danger(self):
        """Lay the Delete account dialog over the window: as wide as
        ``DIALOG_WIDTH`` (less on a window too narrow for it and its
        margins), centred over the conversation, or across the window when
        the conversation is too narrow to hold it with margins (a small
        window), and hung by its top a little above the middle, where an
        error under its password field grows it downward (nothing moves
        under the pointer) and still fits above the bottom."""
        width = min(DIALOG_WIDTH, self.main.winfo_width() - 2 * DIALOG_MARGIN)
        if width < 200:
            width = DIALOG_WIDTH          # not laid out yet: placed again once it is
        wrap = width - 2 * DIALOG_PAD[0] - 2
        self.danger_text.configure(wraplength=wrap)
        self.danger_error.configure(wraplength=wrap)
        self.danger.update_idletasks()
        height = self.danger.winfo_reqheight() - (self.danger_error.winfo_reqheight() + 12
                                                  if self.danger_error.winfo_manager() else 0)
        room = height + 2 * self.fonts.small.metrics("linespace") + 12      # an error of two lines
        area_width, area_height = self.main.winfo_width(), self.main.winfo_height()
        top = _hung_top(area_height, height, room, DIALOG_MARGIN)
        chat_left, chat_width = self.chat.winfo_x(), self.chat.winfo_width()
        if chat_width >= width + 2 * DIALOG_MARGIN:
            left = chat_left + (chat_width - width) // 2
        else:
            left = (area_width - width) // 2
        self.danger.place(x=left, y=top, width=width)
        self.danger_shadow.place(x=left + DIALOG_SHADOW, y=top + DIALOG_SHADOW, width=width,
                                 height=self.danger.winfo_reqheight())
        self.danger_shadow.lift()
        self.danger.lift()

    def _hide_danger(self):
        self.danger_password.delete(0, "end")
        self._clear_danger_error()
        self.danger.grab_release()
        self.danger.place_forget()
        self.danger_shadow.place_forget()

    def _clear_danger_error(self):
        """The dialog's error goes with the question it answered."""
        if self.model.error_about == "delete_account":
            self.model.clear_error()
        self._draw_danger_error("")

    def _delete_account(self):
        password = self.danger_password.get()
        self.danger_password.delete(0, "end")
        self._danger_error_shown = None    # its answer empties the field again, even if it is the last one's
        d = self.controller.delete_account(password)
        d.addCallback(lambda _: self.model.screen == "login" and self._hide_danger())

    def _search(self):
        """Enter in the search box: search for its text; with the results for
        that text shown already, open the first of them, so a person is found
        and written to without reaching for the mouse."""
        m = self.model
        if m.search_pattern is not None and m.search_results:   # any edit since takes them away
            self.open_conversation(m.search_results[0])
            return
        self.controller.search(self.search_entry.get())

    def _clear_search(self):
        """Esc in Find people, or in the list under it: the search closes, and
        the keys are in Find people (its grey hint shows there), to type another name."""
        self.search_entry.delete(0, "end")
        self.model.clear_search()
        self.search_entry.focus_set()

    def _compose_return(self, event):
        self._send()
        return "break"

    def _compose_modified(self, event):
        """Text typed, pasted or cut: a "too long" error goes once it fits."""
        if self.compose.edit_modified():
            self.compose.edit_modified(False)   # so the next change says so again
            self.controller.compose_changed(self._compose_text())

    def _compose_newline(self, event):
        self.compose.insert("insert", "\n")
        return "break"

    def _send(self):
        text = self._compose_text()
        peer = self.model.open_peer
        if not text.strip() or peer is None:
            return
        self.compose.delete("1.0", "end")
        pending = len(self.model.conversation(peer).pending)
        d = self.controller.send(text)
        if len(self.model.conversation(peer).pending) > pending:
            # On its way: show it, even to a reader scrolled up (what others
            # send leaves the view where it is).
            self._at_bottom = True
        d.addCallback(self._put_back, peer)

    def _put_back(self, text, peer):
        """A message that was not sent goes back into the compose box, to cut down or send again:
        only if its conversation is still open and the box is empty, so nothing typed since is lost.
        If another conversation is open now, it becomes this one's draft, unless it has one."""
        if not text:
            return
        if peer != self.model.open_peer:
            if peer not in self.model.drafts:
                self.model.keep_draft(peer, text)
        elif not self._compose_text().strip():
            self.compose.delete("1.0", "end")
            self.compose.insert("1.0", text)

    def _compose_text(self):
        return self.compose.get("1.0", "end-1c")

    def controller_delete_selected(self):
        self.controller.delete_selected()

    def open_conversation(self, peer: str):
        """Open ``peer``'s conversation; what was typed in the one open before stays its draft."""
        self._forget_typed()   # a session that began this very turn: not redrawn yet
        self._empty_search_box()
        before = self.model.open_peer
        switching = before != peer
        if switching and before is not None:
            self.model.keep_draft(before, self._compose_text())
        self.controller.open(peer)
        self._compose_enabled(True)  # now, not at the next redraw: typing may start at once
        if switching:
            self.compose.delete("1.0", "end")
            self.compose.insert("1.0", self.model.take_draft(peer))
        self.compose.focus_set()

    def _key_conversation(self, step):
        """Alt+Up / Alt+Down: the conversation above or below in the sidebar."""
        if self.model.screen == "chats":
            peer = self.model.neighbour(step)
            if peer is not None and peer != self.model.open_peer:
                self.open_conversation(peer)
        return "break"

    def _empty_search_box(self):
        """No text in the search box (its grey hint shows)."""
        self.search_entry.delete(0, "end")

    def _list_clicked(self, event):
        y = self.list_canvas.canvasy(event.y)
        for top, bottom, peer in self._list_rows:
            if top <= y < bottom and peer:
                self.open_conversation(peer)
                return

    def _bubble_clicked(self, event):
        message_id = self._message_at_pointer()
        if message_id is not None:
            self.model.toggle_selected(message_id)

    def _scrolled(self, first, last):
        if float(first) <= 0.0 and float(last) < 1.0:
            self.controller.load_older()

    def close(self):
        """Close the window: stop the client, then the reactor (in main)."""
        if self._closing:
            return
        self._closing = True
        self.coalescer.cancel()
        if self._view_check is not None and self._view_check.active():
            self._view_check.cancel()
        d = self.controller.stop()
        d.addBoth(lambda _: self.on_closed() if self.on_closed else None)
        return d

    # -- drawing ------------------------------------------------------------------------

    def redraw(self, parts: set):
        if self._closing:
            return
        try:
            if "screen" in parts:
                self._draw_screen()
            if "status" in parts:
                self._draw_status()
            if "error" in parts or "screen" in parts:
                self._draw_error()
            if "list" in parts or "search" in parts:
                self._draw_list()
            if "conversation" in parts:
                self._draw_conversation()
            if "settings" in parts or "screen" in parts:
                self._draw_settings()
        except tk.TclError:
            pass  # the window is going away

    def _draw_settings(self):
        """The Account menu's "Read receipts": the server's setting, and off limits until it is known."""
        known = self.model.read_receipts is not None
        self.read_receipts.set(self.model.read_receipts is not False)
        self.account_menu.entryconfigure("Read receipts", state="normal" if known else "disabled")

    def _forget_typed(self):
        """A session ended or began: what was typed in it (the compose box, a
        search) is gone, so the next user of the window never sees it."""
        if self._session == self.model.session:
            return
        self._session = self.model.session
        state = self.compose.cget("state")
        self.compose.configure(state="normal")
        self.compose.delete("1.0", "end")
        self.compose.edit_reset()        # nor can Ctrl+Z bring it back
        self.compose.configure(state=state)
        self._empty_search_box()
        self.password_entry.delete(0, "end")
        self.repeat_entry.delete(0, "end")

    def _draw_login_mode(self):
        """Logging in, or creating an account: then the repeat field shows and
        Create account is the main button."""
        creating = self.model.creating_account
        if creating and not self.repeat_row.winfo_manager():
            self.repeat_row.pack(fill="x", after=self.password_entry)
        elif not creating and self.repeat_row.winfo_manager():
            self.repeat_row.pack_forget()
            self.repeat_entry.delete(0, "end")
            if self.root.focus_get() is self.repeat_entry:
                self.password_entry.focus_set()
        self.create_button.configure(style="Accent.TButton" if creating else "TButton")
        self.login_button.configure(style="TButton" if creating else "Accent.TButton")

    def _draw_screen(self):
        m = self.model
        self.root.title(m.title)
        self._forget_typed()
        if m.screen == "login":
            self.main.pack_forget()
            self.login.pack(fill="both", expand=True)
            self._draw_login_mode()
            self._hide_danger()
            if self.root.focus_get() is None or self.root.focus_get() not in (
                    self.user_entry, self.password_entry, self.repeat_entry):
                (self.password_entry if self.user_entry.get() else self.user_entry).focus_set()
        else:
            arriving = bool(self.login.winfo_manager())
            self.login.pack_forget()
            self.main.pack(fill="both", expand=True)
            self.me_label.configure(text=m.me or "")
            if arriving:
                # Not left in the hidden login fields: where one types next.
                # Just logged in, no conversation is open, so a name to find.
                (self.compose if m.open_peer is not None else self.search_entry).focus_set()
        state = ["disabled"] if m.busy else ["!disabled"]
        for button in (self.login_button, self.create_button, self.danger_button):
            button.state(state)

    def _draw_status(self):
        self.status_label.configure(text=self.model.status)
        # Green only while writes can succeed: connected with no leader is amber, as reconnecting is.
        color = COLORS[self.model.status_level]
        self.status_dot.delete("all")
        self.status_dot.create_oval(1, 1, 9, 9, fill=color, outline=color)

    def _draw_error(self):
        error = self.model.error
        if self.model.error_about != "search":
            self.search_error.pack_forget()
        if self.model.screen == "login":
            self.login_error.configure(text=error)
            self.login_notice.configure(text=self.model.notice)    # an error replaces it
            if self.model.notice and not self.login_notice.winfo_manager():
                self.login_notice.pack(anchor="w", pady=(14, 0))
            elif not self.model.notice:
                self.login_notice.pack_forget()
            self.error_row.grid_forget()
            if error and self._login_error_shown != (error, self.model.error_about):
                self._point_at_login_error()
            self._login_error_shown = (error, self.model.error_about) if error else None
        elif self.model.error_about == "delete_account":
            # In the dialog that asked for the password; kept till the next try or Cancel.
            self.error_row.grid_forget()
            self._draw_danger_error(error)
        elif self.model.error_about == "search":
            # Under the search box; kept till its text changes or the next search.
            self.error_row.grid_forget()
            self.search_error.configure(text=error)
            self.search_error.pack(anchor="w", fill="x", pady=(6, 0))
        elif error:
            self._draw_danger_error("")
            self.error_banner.configure(text=error)
            self.error_row.grid(row=1, column=0, sticky="ew")
            if not self.model.error_sticky:
                self.reactor.callLater(ERROR_SECONDS, self._expire_error, error)
        else:
            self._draw_danger_error("")
            self.error_row.grid_forget()

    def _draw_danger_error(self, error):
        """The Delete account dialog's error, under its password field, which is
        emptied and gets the cursor to type the password again."""
        self.danger_error.configure(text=error)
        if not error:
            self.danger_error.pack_forget()
            self._danger_error_shown = None
            return
        if not self.danger_error.winfo_manager():
            self.danger_error.pack(anchor="w", fill="x", pady=(0, 12), after=self.danger_password)
        if self._danger_error_shown != error and self.danger.winfo_manager():
            self.danger_password.delete(0, "end")
            self.danger_password.focus_set()
        self._danger_error_shown = error

    def _point_at_login_error(self):
        """The cursor goes where the error is: a refused name keeps the password
        typed; a refused password (or a wrong pair) is emptied, to type again."""
        about = self.model.error_about
        if about == "username":
            self.user_entry.focus_set()
            self.user_entry.select_range(0, "end")
            self.user_entry.icursor("end")
        elif about == "password":
            # Creating an account, the repeat too: which of the two was mistyped is not known.
            self.password_entry.delete(0, "end")
            self.repeat_entry.delete(0, "end")
            self.password_entry.focus_set()
        elif about == "repeat":
            self.repeat_entry.focus_set()

    def _expire_error(self, error):
        if self.model.error == error and not self.model.error_sticky and not self._closing:
            self.model.clear_error()

    def _draw_list(self):
        c, f, canvas = COLORS, self.fonts, self.list_canvas
        m = self.model
        self.root.title(m.title)
        canvas.delete("all")
        width = max(canvas.winfo_width(), SIDEBAR_WIDTH - 16)
        self._list_rows = []
        y = 0
        if m.search_pattern is not None:
            line = f.small.metrics("linespace") + 2
            canvas.create_text(16, y + 12, anchor="nw", font=f.small, fill=c["muted"],
                               text=self._clip(f"PEOPLE MATCHING {m.search_pattern}", f.small, width - 32))
            canvas.create_text(16, y + 12 + line, anchor="nw", font=f.small, fill=c["muted"],
                               text=self._clip(self._results_hint(), f.small, width - 32))
            y += 36 + line
            if not m.search_results:
                canvas.create_text(16, y, anchor="nw", font=f.body, fill=c["muted"], text="No one found.")
                y += 30
            for name in m.search_results:
                self._list_rows.append((y, y + 44, name))
                if name == m.list_cursor:
                    self._draw_list_cursor(y, y + 44, width)
                canvas.create_oval(16, y + 8, 44, y + 36, fill=c["accent_soft"], outline="")
                canvas.create_text(30, y + 22, text=name[:1].upper(), font=f.name, fill=c["accent"])
                canvas.create_text(56, y + 22, anchor="w", text=self._clip(name, f.name, width - 56 - 14),
                                   font=f.name, fill=c["text"])
                y += 44
            if m.search_more:
                canvas.create_text(16, y + 6, anchor="nw", font=f.small, fill=c["muted"],
                                   text="More match; type more of the name.")
                y += 30
        else:
            rows = m.conversation_rows()
            if not rows:
                canvas.create_text(width / 2, 40, anchor="n", width=width - 40, justify="center", font=f.body,
                                   fill=c["muted"], text="No conversations yet.\nFind someone above\nto start one.")
            for row in rows:
                top = y
                if row["open"]:
                    canvas.create_rectangle(6, top + 2, width - 6, top + ROW_HEIGHT - 2,
                                            fill=c["accent_soft"], outline="")
                if row["cursor"]:
                    self._draw_list_cursor(top, top + ROW_HEIGHT, width)
                canvas.create_oval(16, top + 14, 54, top + 52, fill=c["accent"] if row["unread"] else c["line"],
                                   outline="")
                canvas.create_text(35, top + 33, text=row["peer"][:1].upper(), font=f.heading,
                                   fill="#FFFFFF" if row["unread"] else c["muted"])
                # The name gives way to the time at the row's right.
                name_width = width - 66 - 14 - f.small.measure(row["time"]) - 10
                canvas.create_text(66, top + 16, anchor="nw", text=self._clip(row["peer"], f.name, name_width),
                                   font=f.name, fill=c["text"])
                canvas.create_text(width - 14, top + 17, anchor="ne", text=row["time"], font=f.small,
                                   fill=c["accent"] if row["unread"] else c["muted"])
                preview_width = width - 66 - (46 if row["unread"] else 16)
                preview = self._clip(row["preview"], f.body if not row["unread"] else f.name, preview_width)
                canvas.create_text(66, top + 38, anchor="nw", text=preview,
                                   font=f.name if row["unread"] else f.body,
                                   fill=c["text"] if row["unread"] else c["muted"])
                if row["unread"]:
                    label = str(row["unread"]) if row["unread"] < 1000 else "999+"
                    w = max(20, f.badge.measure(label) + 12)
                    rounded_rect(canvas, width - 14 - w, top + 38, width - 14, top + 58, 10,
                                 fill=c["accent"], outline="")
                    canvas.create_text(width - 14 - w / 2, top + 48, text=label, font=f.badge, fill="#FFFFFF")
                self._list_rows.append((top, top + ROW_HEIGHT, row["peer"]))
                y += ROW_HEIGHT
        canvas.configure(scrollregion=(0, 0, width, max(y, 1)))
        if m.list_cursor != self._list_cursor_seen:
            self._list_cursor_seen = m.list_cursor
            self._see_list_cursor(max(y, 1))

    def _results_hint(self):
        """Under the search's heading: the keys for its results."""
        if not self.model.search_results:
            return "Esc to close"
        if self.model.list_cursor is not None:
            return "Enter: open   ·   Esc: close"      # the marked one, no longer the first
        return "Enter: open the first   ·   Esc: close"

    def _draw_list_cursor(self, top, bottom, width):
        """The row the keys are on: a blue outline, where the open conversation's
        row is filled, so the two are told apart (and both show on one row)."""
        self.list_canvas.create_rectangle(7, top + 3, width - 7, bottom - 3, outline=COLORS["accent"], width=2,
                                          tags=("list_cursor",))

    def _see_list_cursor(self, total):
        """Scroll the list so the keys' row is in view (the first row: the list's top, heading included)."""
        canvas = self.list_canvas
        rows = [(top, bottom) for top, bottom, peer in self._list_rows if peer == self.model.list_cursor]
        if not rows:
            return
        top, bottom = rows[0]
        view_top, height = canvas.canvasy(0), canvas.winfo_height()
        if height <= 1:
            return      # not laid out yet: the first rows show
        if top == self._list_rows[0][0]:
            canvas.yview_moveto(0.0)
        elif top < view_top:
            canvas.yview_moveto(top / total)
        elif bottom > view_top + height:
            canvas.yview_moveto((bottom - height) / total)

    def _line_width(self, text, font):
        """How wide the conversation draws one line: Font.measure counts a tab
        as one narrow character, where the canvas moves on to the next tab
        stop (a pasted line of code), so such a line is measured as drawn."""
        if "\t" not in text:
            return font.measure(text)
        probe = self.canvas.create_text(0, 0, anchor="nw", text=text, font=font)
        left, _, right, _ = self.canvas.bbox(probe)
        self.canvas.delete(probe)
        return right - left

    def _clip(self, text, font, width):
        if font.measure(text) <= width:
            return text
        while text and font.measure(text + "…") > width:
            text = text[:-1]
        return text + "…"

    def _compose_enabled(self, enabled: bool):
        """With no conversation open there is no one to send to: the compose box and Send are off."""
        self.compose.configure(state="normal" if enabled else "disabled",
                               background=COLORS["bg"] if enabled else COLORS["panel"])
        self.send_button.state(["!disabled"] if enabled else ["disabled"])

    def _draw_delete_controls(self):
        """The "Delete N selected" button, or the question it asks, at the right of the header.

        Placed, not packed: showing them must not make the header taller,
        which would move every bubble under the pointer between two clicks.
        So they would cover the peer's name on a narrow window: the question
        gets shorter first, then the name is clipped beside them."""
        m, place = self.model, dict(relx=1.0, rely=0.5, x=-CONTROLS_INSET, anchor="e")
        shown = m.open_peer is not None and m.selected
        controls = 0                  # how much of the header's right they cover
        if shown and m.confirming_delete:
            buttons = (self.confirm_delete_button.winfo_reqwidth() + 8    # 8: Cancel's padx
                       + self.confirm_cancel_button.winfo_reqwidth())
            room = self._header_room() - CONTROLS_INSET - buttons - 10 - HEADER_GAP  # 10: the question's padx
            # The longest question that leaves the whole name; else one that
            # leaves the name's start; else the shortest, which still says the
            # messages go for both people, with what room is left for the name.
            questions = m.delete_questions
            name = self.fonts.heading.measure(m.open_peer)
            question = next((q for q in questions if self.fonts.body.measure(q) + name <= room), None)
            if question is None:
                name = min(name, NAME_KEPT_WIDTH)
                question = next((q for q in questions if self.fonts.body.measure(q) + name <= room), questions[-1])
            self.confirm_label.configure(text=question)
            self.confirm_bar.place(**place)
            self.confirm_bar.update_idletasks()      # its width with that question
            controls = self.confirm_bar.winfo_reqwidth()
        else:
            self.confirm_bar.place_forget()
        if shown and not m.confirming_delete:
            self.delete_button.configure(text=f"Delete {len(m.selected)} selected")
            self.delete_button.place(**place)
            controls = self.delete_button.winfo_reqwidth()
        else:
            self.delete_button.place_forget()
        self._draw_peer_name(controls)

    def _header_room(self):
        """Width inside the conversation header's padding, where its children are placed
        (before it is laid out: unbounded)."""
        width = self.peer_label.master.winfo_width()
        return width - 2 * HEADER_PAD_X if width > 1 else 10 ** 6

    def _draw_peer_name(self, controls):
        """The peer's name, clipped to what the delete controls placed over the header leave."""
        peer = self.model.open_peer or ""
        room = self._header_room() - (CONTROLS_INSET + controls + HEADER_GAP if controls else 0)
        self.peer_label.configure(text=self._clip(peer, self.fonts.heading, max(room, 0)))

    def _draw_conversation(self):
        c, f, canvas, m = COLORS, self.fonts, self.canvas, self.model
        peer = m.open_peer
        canvas.delete("all")
        width = canvas.winfo_width()
        height = canvas.winfo_height()
        if peer is None:
            self._compose_enabled(False)
            self._draw_delete_controls()
            canvas.create_text(width / 2, height / 2 - 20, text="Select a conversation", font=f.heading,
                               fill=c["muted"])
            canvas.create_text(width / 2, height / 2 + 8, font=f.body, fill=c["muted"],
                               text="or find someone on the left to start one.")
            canvas.configure(scrollregion=(0, 0, width, height))
            self._last_drawn = (None, None, 0)
            self._draw_unseen_cue()
            return
        conv = m.conversation(peer)
        self._compose_enabled(True)
        self._draw_delete_controls()

        old_peer, old_oldest, old_height = self._last_drawn
        top_before = canvas.canvasy(0)
        at_bottom = self._at_bottom or old_peer != peer

        max_w = max(160, min(int(width * 0.66), 560))
        pad_x, pad_y, margin = 14, 9, 20
        y = 16
        if conv.more_before and conv.messages:
            canvas.create_text(width / 2, y, anchor="n", font=f.small, fill=c["muted"],
                               text="Loading older messages…" if conv.loading_older else "Scroll up for older messages")
            y += 28
        elif conv.messages:
            # One line, whatever the width: the messages below keep their place.
            canvas.create_text(width / 2, y, anchor="n", font=f.small, fill=c["muted"],
                               text=self._clip(f"This is the beginning of your conversation with {peer}.",
                                               f.small, width - 2 * margin))
            y += 28
        elif not conv.loaded_once:
            canvas.create_text(width / 2, y + 20, anchor="n", font=f.body, fill=c["muted"], text="Loading…")
        else:
            canvas.create_text(width / 2, y + 20, anchor="n", font=f.body, fill=c["muted"],
                               text=f"No messages with {peer} yet. Say hello!")
        note_above, note = m.account_notes()

        def draw_note(y):
            # Where a reused name's new account begins: one muted line, or two.
            text_id = canvas.create_text(width / 2, y + 14, anchor="n", font=f.small, fill=c["muted"],
                                         text=note, justify="center", width=width - 2 * margin)
            return canvas.bbox(text_id)[3] + 4

        for b in m.bubbles():
            mine = b["mine"]
            tag = f"msg{b['id']}" if b["id"] is not None else "pending"
            tags = ("bubble", tag)
            if note is not None and note_above is not None and b["id"] == note_above:
                y = draw_note(y)
            y += 14 if b["first_in_run"] else 4
            if b["first_in_run"] and not mine:
                canvas.create_text(margin + 4, y, anchor="nw", text=b["sender"], font=f.name, fill=c["text"])
                y += f.name.metrics("linespace") + 4
            text_fill = c["bubble_out_text"] if mine else c["text"]
            meta_fill = "#D5E1FA" if mine else c["muted"]
            body_id = canvas.create_text(0, 0, anchor="nw", text=b["body"], width=max_w - 2 * pad_x,
                                         font=f.body, fill=text_fill, tags=tags)
            meta_id = canvas.create_text(0, 0, anchor="nw", text=b["time"], font=f.small, fill=meta_fill,
                                         tags=tags)
            bx0, by0, bx1, by1 = canvas.bbox(body_id)
            mx0, my0, mx1, my1 = canvas.bbox(meta_id)
            body_w, meta_w, meta_h = bx1 - bx0, mx1 - mx0, my1 - my0
            # The time sits after the last line when it fits there, else under the text.
            last_line_w = self._line_width(b["body"].split("\n")[-1], f.body) if by1 - by0 < 2.2 * f.body.metrics(
                "linespace") else max_w
            inline = last_line_w + 12 + meta_w <= max_w - 2 * pad_x
            if inline:
                inner_w = max(body_w, last_line_w + 12 + meta_w)
                inner_h = by1 - by0
            else:
                inner_w = max(body_w, meta_w)
                inner_h = (by1 - by0) + meta_h + 2
            bw, bh = inner_w + 2 * pad_x, inner_h + 2 * pad_y
            x0 = width - margin - bw if mine else margin
            outline = c["selected"] if b["selected"] else (c["accent"] if mine else c["bubble_in_line"])
            bubble = rounded_rect(canvas, x0, y, x0 + bw, y + bh, 16,
                                  fill=c["accent"] if mine else c["bubble_in"], outline=outline,
                                  width=3 if b["selected"] else 1, tags=tags)
            canvas.tag_lower(bubble, body_id)
            canvas.coords(body_id, x0 + pad_x, y + pad_y)
            canvas.coords(meta_id, x0 + bw - pad_x - meta_w, y + bh - pad_y - meta_h + (1 if inline else 0))
            y += bh
            if b["receipt"]:
                canvas.create_text(x0 + bw - 6, y + 3, anchor="ne", text=b["receipt"], font=f.small,
                                   fill=c["muted"], tags=("receipt",))
                y += f.small.metrics("linespace") + 3
        if note is not None and note_above is None:
            y = draw_note(y)
        y += 20
        total = max(y, height)
        canvas.configure(scrollregion=(0, 0, width, total))
        if at_bottom:
            canvas.yview_moveto(1.0)
        elif old_peer == peer and conv.oldest_id != old_oldest and old_height:
            # Older messages came in above: keep what the reader was looking at in place.
            canvas.yview_moveto((top_before + total - old_height) / total)
        self._last_drawn = (peer, conv.oldest_id, total)
        self._at_bottom = canvas.yview()[1] >= 0.999
        self._draw_unseen_cue()
        self._check_in_view()


def build_parser():
    parser = argparse.ArgumentParser(prog="paxchat-gui", description="The paxchat desktop app.")
    parser.add_argument("--config", default=os.environ.get("PAXCHAT_CONFIG", "cluster.ini"),
                        help="the cluster.ini naming the nodes (default: ./cluster.ini or $PAXCHAT_CONFIG)")
    parser.add_argument("--node", type=int, help="try this node first (default: a random node of the config)")
    return parser


def client_maker(reactor, config_path, prefer_node=None):
    """``make_client(on_event, on_status)`` for ChatController; errors are one readable line."""
    def make_client(on_event, on_status):
        from paxchat.config import load
        from .api import PaxchatClient
        config = load(config_path)
        try:
            return PaxchatClient.from_config(reactor, config, prefer_node=prefer_node,
                                             on_event=on_event, on_status=on_status)
        except Exception as e:
            raise RuntimeError(f"Cannot set up TLS: {e}") from None
    return make_client


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        root = tk.Tk(className="paxchat")
    except tk.TclError as e:
        print(f"paxchat-gui: cannot open a window ({e}); is DISPLAY set?", file=sys.stderr)
        raise SystemExit(2)
    from twisted.internet import reactor, tksupport
    tksupport.install(root)
    app = ChatApp(root, reactor, client_maker(reactor, args.config, args.node), on_closed=reactor.stop)
    app.user_entry.focus_set()
    reactor.run()
    tksupport.uninstall()
    try:
        root.destroy()
    except tk.TclError:
        pass


if __name__ == "__main__":
    main()

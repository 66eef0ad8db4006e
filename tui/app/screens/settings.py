"""Generation settings and the draft (editable) and the plan (read-only), as a modal."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from rich.markup import escape
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical, VerticalScroll
from textual.reactive import reactive
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Select, Static

from ....shared.draft.spec import NGRAM_DEFAULT, DraftSpec
from ....shared.errors import UsageError
from ..config import ChatSettings
from ..engine import PlanInfo
from ..messages import DraftChecked
from ..widgets.key_footer import KeyFooter

if TYPE_CHECKING:
    from ..engine import ChatEngine

log = logging.getLogger(__name__)

FIELDS = (
    ("max_new_tokens", "max new tokens", "integer"),
    ("temperature", "temperature", "number"),
    ("top_k", "top-k", "integer"),
    ("top_p", "top-p", "number"),
    ("seed", "seed", "integer"),
)

DRAFT_KINDS = (
    ("off", "off"),
    ("ngram: prompt lookup", "ngram"),
    ("model:PATH, same tokenizer", "model"),
    ("student:PATH, from distill", "student"),
)
"""The draft select's options: (label, ``--draft`` kind)."""

DRAFT_TARGET_LABELS = {"off": "draft path", "ngram": "ngram length", "model": "draft path", "student": "draft path"}
"""The label of the draft's path box, per kind (prompt lookup takes a length, not a path)."""

DRAFT_TARGET_HINTS = {
    "off": "",
    "ngram": f"tokens to match, 1-8 (default {NGRAM_DEFAULT})",
    "model": "a model directory, .gguf or name",
    "student": "the student's directory",
}
"""The placeholder of the draft's path box, per kind."""


def draft_fields(draft: str) -> tuple[str, str]:
    """A ``--draft`` value as the form's (kind, path box)."""
    spec = DraftSpec.parse(draft)
    target = "" if spec.kind == "ngram" and spec.target == str(NGRAM_DEFAULT) else spec.target
    return spec.kind, target


def draft_value(kind: str, target: str) -> str:
    """The form's (kind, path box) as a ``--draft`` value (``DraftSpec.parse`` judges it)."""
    target = target.strip()
    if kind == "off":
        return "off"
    return f"{kind}:{target}" if target or kind != "ngram" else kind


def plan_lines(plan: PlanInfo | None, address: str) -> list[tuple[str, str]]:
    if plan is None:
        return [("daemon", address), ("plan", "not loaded (is the daemon up?)")]
    a, b = plan.split
    return [
        ("model", f"{plan.model} ({plan.family}, {plan.layers} layers)"),
        ("split", f"bottom [0, {a}) here · trunk [{a}, {b}) on {plan.trunk_device} · top [{b}, {plan.layers}) here"),
        ("fingerprint", plan.fingerprint),
        ("daemon", f"{plan.address} (splitlm-trunkd {plan.server_version})"),
        ("local parts", f"{plan.local_device}, {plan.local_dtype}"),
        ("context limit", f"{plan.max_context} tokens" if plan.max_context else "the model's"),
    ]


class SettingsScreen(ModalScreen[ChatSettings | None]):
    """Edits a copy of the settings; dismisses with the new settings, or None on cancel.

    A new draft is built before the screen closes (``ChatEngine.check_draft``, on a worker), so
    one that cannot work (a missing path, another tokenizer) is refused here, in place, and the
    old draft stays; it takes over from the next reply.

    | Key | Action |
    | :- | :- |
    | ctrl+s | save |
    | escape | cancel |
    """

    BINDINGS = [
        Binding("ctrl+s", "save", "Save", priority=True),
        Binding("escape", "cancel", "Cancel"),
    ]

    checking: reactive[bool] = reactive(False)
    """A new draft is being built; saving again waits for it."""

    def __init__(
        self, settings: ChatSettings, plan: PlanInfo | None, address: str, engine: ChatEngine | None = None
    ) -> None:
        """Args:
            engine: builds a newly chosen draft before the screen closes (None: not checked).
        """
        super().__init__(id="settings")
        self.settings = settings
        self.plan = plan
        self.address = address
        self.engine = engine
        self._draft_kind = "off"
        """The draft select's kind as last seen."""

    def compose(self) -> ComposeResult:
        s = self.settings.to_dict()
        with Vertical(id="settings-box"):
            yield Label("Settings", classes="box-title")
            with VerticalScroll():
                with Grid(id="settings-grid"):
                    for key, label, kind in FIELDS:
                        yield Label(label)
                        value = "" if s[key] is None else str(s[key])
                        placeholder = "random" if key == "seed" else kind
                        yield Input(value, placeholder=placeholder, id=f"set-{key}",
                                    type="integer" if kind == "integer" else "number")
                    yield Label("system prompt")
                    yield Input(s["system_prompt"], placeholder="none", id="set-system_prompt")
                    kind, target = draft_fields(self.settings.draft)
                    self._draft_kind = kind
                    yield Label("draft")
                    yield Select(((label, k) for label, k in DRAFT_KINDS), value=kind, allow_blank=False,
                                 compact=True, id="set-draft-kind")
                    yield Label(DRAFT_TARGET_LABELS[kind], id="set-draft-target-label")
                    yield Input(target, placeholder=DRAFT_TARGET_HINTS[kind], id="set-draft-target",
                                disabled=kind == "off")
                    yield Label("draft max")
                    yield Input(str(s["draft_max"]), placeholder="integer", id="set-draft_max", type="integer")
                yield Label("", id="settings-error")
                yield Label("Plan (read-only)", classes="box-subtitle")
                for name, value in plan_lines(self.plan, self.address):
                    yield Static(f"[dim]{name:>13}[/] {value}", classes="plan-line", markup=True)
            with Horizontal(classes="buttons"):
                yield Button("Save (ctrl+s)", variant="primary", id="save", compact=True)
                yield Button("Cancel (esc)", id="cancel", compact=True)
        yield KeyFooter()

    def on_mount(self) -> None:
        for inp in self.query(Input):
            inp.cursor_blink = getattr(self.app, "config", None) is None or self.app.config.animations  # type: ignore[attr-defined]
        self.query_one("#set-max_new_tokens", Input).focus()

    def fields(self) -> dict[str, str]:
        out = {inp.id.removeprefix("set-"): inp.value for inp in self.query(Input) if inp.id}
        kind = self.query_one("#set-draft-kind", Select).value
        out["draft"] = draft_value(str(kind), out.pop("draft-target", ""))
        return out

    def show_error(self, text: str) -> None:
        self.query_one("#settings-error", Label).update(f"[b]{escape(text)}[/b]" if text else "")

    @on(Select.Changed, "#set-draft-kind")
    def _draft_kind_changed(self, event: Select.Changed) -> None:
        target = self.query_one("#set-draft-target", Input)
        kind = str(event.value)
        if (kind == "ngram") != (self._draft_kind == "ngram"):
            target.value = ""  # a length is no path, and a path no length
        self._draft_kind = kind
        target.placeholder = DRAFT_TARGET_HINTS.get(kind, "")
        self.query_one("#set-draft-target-label", Label).update(DRAFT_TARGET_LABELS.get(kind, "draft path"))
        target.disabled = kind == "off"
        if kind in ("model", "student"):
            target.focus()

    def action_save(self) -> None:
        if self.checking:
            return
        try:
            settings = ChatSettings.parse(self.fields())
        except UsageError as e:
            self.show_error(str(e))
            return
        if settings.draft != self.settings.draft and self.engine is not None and self.engine.loaded:
            self.checking = True
            self.query_one("#settings-error", Label).update(escape(f"building the draft {settings.draft}…"))
            self.check_draft(settings)
            return
        self.dismiss(settings)

    @work(thread=True, exclusive=True, group="draft-check", exit_on_error=False)
    def check_draft(self, settings: ChatSettings) -> None:
        """Build the new draft off the UI thread (a model draft loads weights)."""
        assert self.engine is not None
        try:
            self.engine.check_draft(settings.draft_spec())
        except UsageError as e:
            self.post_message(DraftChecked(settings, str(e)))
            return
        except Exception as e:  # a bug: logged with its traceback, told in place
            log.exception("building the draft %s failed", settings.draft)
            self.post_message(DraftChecked(settings, f"{type(e).__name__}: {e}"))
            return
        self.post_message(DraftChecked(settings, ""))

    def on_draft_checked(self, msg: DraftChecked) -> None:
        self.checking = False
        if msg.error:
            self.show_error(msg.error)
            return
        self.dismiss(msg.settings)

    def action_cancel(self) -> None:
        self.dismiss(None)

    @on(Button.Pressed, "#save")
    def _save_pressed(self) -> None:
        self.action_save()

    @on(Button.Pressed, "#cancel")
    def _cancel_pressed(self) -> None:
        self.action_cancel()

    @on(Input.Submitted)
    def _submitted(self) -> None:
        self.action_save()

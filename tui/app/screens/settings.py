"""Generation settings (editable) and the plan (read-only), as a modal."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static

from ....shared.errors import UsageError
from ..config import ChatSettings
from ..engine import PlanInfo
from ..widgets.key_footer import KeyFooter

FIELDS = (
    ("max_new_tokens", "max new tokens", "integer"),
    ("temperature", "temperature", "number"),
    ("top_k", "top-k", "integer"),
    ("top_p", "top-p", "number"),
    ("seed", "seed", "integer"),
)


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

    | Key | Action |
    | :- | :- |
    | ctrl+s | save |
    | escape | cancel |
    """

    BINDINGS = [
        Binding("ctrl+s", "save", "Save", priority=True),
        Binding("escape", "cancel", "Cancel"),
    ]

    def __init__(self, settings: ChatSettings, plan: PlanInfo | None, address: str) -> None:
        super().__init__(id="settings")
        self.settings = settings
        self.plan = plan
        self.address = address

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
        return {inp.id.removeprefix("set-"): inp.value for inp in self.query(Input) if inp.id}

    def action_save(self) -> None:
        try:
            settings = ChatSettings.parse(self.fields())
        except UsageError as e:
            self.query_one("#settings-error", Label).update(f"[b]{e}[/b]")
            return
        self.dismiss(settings)

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

"""Clicks: a session over one volume that refines any class of a click-trained adapter, and the
prompts it, training and the service share; imports inference/ and what lies below it."""

from .prompts import ClicksNotTrainedError, SliceClick, click_coords, decode_clicks, mask_prompt, require_clicks
from .protocol import next_click, round_clicks
from .session import ClickSession, SessionChangedError

__all__ = ["ClickSession", "ClicksNotTrainedError", "SessionChangedError", "SliceClick", "click_coords",
           "decode_clicks", "mask_prompt", "next_click", "require_clicks", "round_clicks"]

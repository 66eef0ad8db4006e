"""``splitlm serve``: an OpenAI-compatible HTTP endpoint on the client (issue 15).

The gateway owns the tokenizer, the bottom, the top and the sampler, like every face of the
client; the trunk runs in the daemon. Requests are parsed into the shared engine's settings
(``protocol``), served on trunk sessions kept per conversation prefix (``sessions``), run by the
one generation loop (``engine``) and answered over HTTP (``app``); ``run`` starts it.

This face never imports another face (``tui.app``, ``tui.bench``); what it shares lives in
``shared``.
"""

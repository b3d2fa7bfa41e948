"""The parts of delivery to DingTalk, composed by `zkdingsync.forwarder.Forwarder` (a thin loop).

- `ports`: what delivery needs from the store, the DingTalk client and the user mapper (Protocols).
- `parts`: the parts dispatch and the settler share.
- `gate`: may delivery send now? Pause, hold, call numbering and the barrier: a clock in, a decision out.
- `health`: the gate's changes told to people: the journal, the alert hook, the health `status` shows.
- `budget`: the monthly call budget (warning, exhaustion, renewal).
- `ratelimit`: the token bucket that spaces calls.
- `dispatch`: one batch: claim, prepare, upload from a small pool, record each answer at once.
- `settler`: punches left in flight, settled by reading DingTalk back (planning and matching).
- `refresh`: the job number table fetched beside delivery, not in its way.
"""

"""A copy job's whole online table change (``[copy] sync = "trigger"``): the sync trigger
installed with the key range (``sync``), the cut-over and its way back (``swap``), and each
job's place in it (``phase``).

The steps, each one transaction that records the job's phase with what it changed, so a kill
at any moment leaves the step done or not done, and running it again goes on:

* ``run`` installs the forward trigger (source -> target) in the transaction that fixes the key
  range, then copies (phase ``syncing``: ``copying``, then ``copied``);
* ``cutover`` swaps the names under a short ``lock_timeout``, retried with backoff, moves the
  sequences, defaults, grants and referencing foreign keys, and replaces the forward trigger by
  the reverse one (new -> old) so the old table stays current (``cut over``);
* ``rollback`` swaps back while the reverse trigger is in place (``rolled back``: the forward
  trigger again, ready for another cut-over);
* ``finish`` drops the triggers and their functions (``finished``; the old table is the
  user's to drop).
"""

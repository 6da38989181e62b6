"""The pod's network on the host (Kata's tcfilter model): read what CNI made in the
pod's network namespace (``discover``), join each interface to a tap carapace makes
there with tc mirred (``tcfilter``), count the taps' traffic (``stats``). ``model`` is
what the guest is told. Host only: the guest never imports this package."""

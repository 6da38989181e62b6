from carapace.shim.main import main

raise SystemExit(main())

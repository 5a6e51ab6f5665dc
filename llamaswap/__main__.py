from llamaswap.service.cli import main

raise SystemExit(main())

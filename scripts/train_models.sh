#!/usr/bin/env bash
# Reproduce the two shipped models from generated phantoms (CPU settings; a GPU trains the same
# plans faster). Data goes to data/ (not committed); models to models/.
set -euo pipefail
cd "$(dirname "$0")/.."

segnode phantom dx --out data/dx-train --seed 0 --count 30 --matrix 512
segnode train --data data/dx-train --out models/dx-chest-phantom-2d --seed 0 --epochs 40 --steps 25 \
    --budget 25600 --base-filters 16 --min-spacing 2.5 --validation-cases 3 --validate-every 5

segnode phantom ct --out data/ct-train --seed 0 --count 20 --matrix 128
segnode train --data data/ct-train --out models/ct-abdomen-phantom-3d --seed 0 --epochs 40 --steps 25 \
    --budget 204800 --base-filters 8 --min-spacing 4 --validation-cases 2 --validate-every 5

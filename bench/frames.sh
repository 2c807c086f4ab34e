#!/usr/bin/env bash
# Frame times of the app while the default workflow runs, on Mesa's software renderer
# (lavapipe) under Xvfb at SIZE (1600x1000 unless set): queues RUNS default runs (10 unless set; the start seed
# set to increment, so no run is served from the cache), waits for them, and prints the
# percentiles the app's frame log (FLOWLINE_FRAME_LOG) records.
#
# Needs: xvfb, xdotool, mesa-vulkan-drivers (Debian/Ubuntu package names). Run it on an
# otherwise idle machine: another job on the cores shows up as long frames.
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${RUNS:-10}"
size="${SIZE:-1600x1000}"
width="${size%x*}"
height="${size#*x}"
cargo build --release --quiet
binary="${CARGO_TARGET_DIR:-target}/release/flowline"
work="$(mktemp -d)"
trap '[ -n "${KEEP:-}" ] || rm -rf "$work"' EXIT
mkdir -p "$work/home" "$work/runtime" "$work/out"
chmod 700 "$work/runtime"
python3 - assets/workflows/default.json "$work/workflow.json" <<'WORKFLOW'
import json, sys
workflow = json.load(open(sys.argv[1]))
workflow["ui"] = {"seed_control": {"start": {"seed": "increment"}}}
json.dump(workflow, open(sys.argv[2], "w"))
WORKFLOW

cat > "$work/session.sh" <<SESSION
#!/usr/bin/env bash
set -euo pipefail
cd "$work/out"
HOME="$work/home" XDG_RUNTIME_DIR="$work/runtime" FLOWLINE_FRAME_LOG="$work/frames.json" \
    "$(realpath "$binary")" open "$work/workflow.json" > "$work/app.log" 2>&1 &
app=\$!
window=\$(xdotool search --sync --name Flowline | head -n 1)
xdotool windowsize --sync "\$window" $width $height
xdotool windowfocus --sync "\$window"
sleep 3
for _ in \$(seq "$runs"); do xdotool key --clearmodifiers ctrl+Return; done
# The log is written each time runs stop streaming: wait until it stops changing.
previous=""
steady=0
for _ in \$(seq 600); do
    sleep 1
    current=\$(cat "$work/frames.json" 2>/dev/null || true)
    if [ -n "\$current" ] && [ "\$current" = "\$previous" ]; then
        steady=\$((steady + 1))
        [ "\$steady" -ge 5 ] && break
    else
        steady=0
    fi
    previous="\$current"
done
kill "\$app"
SESSION
chmod +x "$work/session.sh"
xvfb-run -a -s "-screen 0 ${width}x${height}x24" "$work/session.sh"

python3 - "$work/frames.json" "$size" <<'REPORT'
import json, sys
log = json.load(open(sys.argv[1]))
print(f"{log['steps'] // 16} default runs at {sys.argv[2]} on the software renderer: "
      f"{log['streaming_frames']} frames while streaming, {log['steps']} steps")
print(f"{'measure':<34}{'p50':>8}{'p90':>8}{'p99':>8}{'max':>8}")
for key, name in [("streaming_frame_interval_ms", "frame time while streaming (ms)"),
                  ("streaming_ui_ms", "UI build while streaming (ms)"),
                  ("step_to_frame_ms", "step to frame (ms)")]:
    row = log[key]
    cells = "".join(f"{row[q]:8.1f}" if row[q] is not None else f"{'-':>8}"
                    for q in ("p50", "p90", "p99", "max"))
    print(f"{name:<34}{cells}")
REPORT

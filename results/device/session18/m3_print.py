"""Medians (ms) of an M3 device run's decisions: m3_print.py M3_DEVICE_JSON"""
import json, sys
d = json.load(open(sys.argv[1]))
for source, controllers in d["decision"].items():
    print(source, {name: round(s["median"], 4) for name, s in controllers.items()})

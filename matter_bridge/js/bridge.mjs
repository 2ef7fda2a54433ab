// ORES Hub's Matter device side: a matter.js ServerNode whose Aggregator holds one bridged endpoint per module.
// The hub (matter_bridge/process.py) starts this process and drives it with JSON lines on stdin; it answers and
// reports events as JSON lines on stdout; every matter.js log line goes to stderr.  This file knows nothing of
// ORES: only endpoint kinds (solar, battery, meter, plug) and cluster values in Matter units.  The message schema
// is documented in docs/matter.md; keep the two in step.
//
// usage: node bridge.mjs storage=DIR [port=5540] [passcode=N] [discriminator=N] [vendor-id=0xFFF1]
//          [product-id=0x8000] [vendor-name=ORES] [product-name=ORES Hub] [serial=S] [version=0.1.0]
//          [log-level=notice] [ipv4=1] [interface=NAME]
import { createInterface } from "node:readline";

const PROTOCOL = 1;
const MATTER_JS = "0.17.9";

// Options are key=value words, never --flags: matter.js reads every --flag of process.argv into its own
// configuration (a --storage flag makes it fail with "segment storage is not a map").
const opt = {
    port: "5540",
    passcode: "20202021",
    discriminator: "3840",
    "vendor-id": "0xFFF1",
    "product-id": "0x8000",
    "vendor-name": "ORES",
    "product-name": "ORES Hub",
    serial: "ores-hub",
    version: "0.1.0",
    "log-level": "notice",
};
for (const arg of process.argv.slice(2)) {
    const eq = arg.indexOf("=");
    if (eq <= 0 || arg.startsWith("-")) {
        process.stderr.write(`bad argument ${arg}: expected key=value\n`);
        process.exit(2);
    }
    opt[arg.slice(0, eq)] = arg.slice(eq + 1);
}
if (!opt.storage) {
    process.stderr.write("storage=DIR is required\n");
    process.exit(2);
}
// matter.js reads MATTER_* variables when it is imported: set ours first.
process.env.MATTER_STORAGE_PATH = opt.storage;
process.env.MATTER_PATH_ROOT = opt.storage;
process.env.MATTER_LOG_FORMAT = "plain";
if (opt.ipv4 === "0") process.env.MATTER_MDNS_IPV4 = "false"; // mDNS over IPv6 only
if (opt.interface) process.env.MATTER_MDNS_NETWORKINTERFACE = opt.interface;

const { Endpoint, Logger, ServerNode, SubscriptionsServer, VendorId } = await import("@matter/main");
const { BridgedDeviceBasicInformationServer } = await import("@matter/main/behaviors/bridged-device-basic-information");
const { PowerSourceServer } = await import("@matter/main/behaviors/power-source");
const { PowerTopologyServer } = await import("@matter/main/behaviors/power-topology");
const { ElectricalPowerMeasurementServer } = await import("@matter/main/behaviors/electrical-power-measurement");
const { ElectricalEnergyMeasurementServer } = await import("@matter/main/behaviors/electrical-energy-measurement");
const { PowerSource, PowerTopology, ElectricalPowerMeasurement, ElectricalEnergyMeasurement } = await import(
    "@matter/main/clusters"
);
const { SolarPowerDevice } = await import("@matter/main/devices/solar-power");
const { BatteryStorageDevice } = await import("@matter/main/devices/battery-storage");
const { OnOffPlugInUnitDevice, OnOffPlugInUnitRequirements } = await import("@matter/main/devices/on-off-plug-in-unit");
const { AggregatorEndpoint } = await import("@matter/main/endpoints/aggregator");
const { ElectricalSensorEndpoint } = await import("@matter/main/endpoints/electrical-sensor");
const { PowerSourceEndpoint } = await import("@matter/main/endpoints/power-source");
const { DeviceCommissioner, FabricManager } = await import("@matter/main/protocol");
const { FabricIndex } = await import("@matter/main/types");

Logger.level = opt["log-level"];
Logger.format = "plain";
Logger.destinations.default.write = text => process.stderr.write(text + "\n");

let stopping = false;
function emit(obj) {
    if (!stopping || obj.event === "stopped") process.stdout.write(JSON.stringify(obj) + "\n");
}
// The hub went away (pipe closed): nobody is left to talk to, stop cleanly.
process.stdout.on("error", () => shutdown(0));

// ---- endpoint kinds -------------------------------------------------------------------------------------------

// A plug's On/Off commands go to the hub, which switches the real module through its control path and then
// confirms (or corrects) the OnOff attribute with an "update".  The attribute changes optimistically here.
class HubOnOffServer extends OnOffPlugInUnitRequirements.OnOffServer {
    on() {
        emit({ event: "command", id: this.endpoint.id, cluster: "onOff", command: "on" });
        return super.on();
    }
    off() {
        emit({ event: "command", id: this.endpoint.id, cluster: "onOff", command: "off" });
        return super.off();
    }
    toggle() {
        // One event with the resulting state (the base toggle() calls on()/off() and would report twice).
        const on = !this.state.onOff;
        emit({ event: "command", id: this.endpoint.id, cluster: "onOff", command: on ? "on" : "off", via: "toggle" });
        return on ? super.on() : super.off();
    }
}

const acPower = ElectricalPowerMeasurementServer.with(ElectricalPowerMeasurement.Feature.AlternatingCurrent);
const energy = ElectricalEnergyMeasurementServer.with(
    ElectricalEnergyMeasurement.Feature.ImportedEnergy,
    ElectricalEnergyMeasurement.Feature.ExportedEnergy,
    ElectricalEnergyMeasurement.Feature.CumulativeEnergy,
);
const nodeTopology = PowerTopologyServer.with(PowerTopology.Feature.NodeTopology);
const MAX_MW = 100_000_000; // +-100 kW in mW
const MEASURE_ACTIVE_POWER = 5; // MeasurementType.ActivePower
const MEASURE_ENERGY = 14; // MeasurementType.ElectricalEnergy

function powerDefaults() {
    return {
        powerMode: ElectricalPowerMeasurement.PowerMode.Ac,
        numberOfMeasurementTypes: 1,
        accuracy: [
            {
                measurementType: MEASURE_ACTIVE_POWER,
                measured: true,
                minMeasuredValue: -MAX_MW,
                maxMeasuredValue: MAX_MW,
                accuracyRanges: [{ rangeMin: -MAX_MW, rangeMax: MAX_MW, fixedMax: 1000 }],
            },
        ],
        activePower: null,
        voltage: null,
        activeCurrent: null,
    };
}
function energyDefaults() {
    return {
        accuracy: {
            measurementType: MEASURE_ENERGY,
            measured: true,
            minMeasuredValue: 0,
            maxMeasuredValue: 1e15,
            accuracyRanges: [{ rangeMin: 0, rangeMax: 1e15, fixedMax: 1000 }],
        },
        cumulativeEnergyImported: null,
        cumulativeEnergyExported: null,
    };
}
const dt = (deviceType, revision) => ({ deviceType, revision });
const POWER_SOURCE = dt(PowerSourceEndpoint.deviceType, 1);
const ELECTRICAL_SENSOR = dt(ElectricalSensorEndpoint.deviceType, 1);

// In matter.js 0.17.9 Solar Power and Battery Storage have no mandatory clusters of their own: they are composed
// with the utility device types Power Source and Electrical Sensor on the same endpoint, and the descriptor lists
// all of them.  Bridged Node (0x0013) is added by the BridgedDeviceBasicInformation server.
const KINDS = {
    solar: {
        type: SolarPowerDevice.with(
            BridgedDeviceBasicInformationServer,
            PowerSourceServer.with(PowerSource.Feature.Wired),
            nodeTopology,
            acPower,
            energy,
        ),
        deviceTypes: [dt(0x0017, 1), POWER_SOURCE, ELECTRICAL_SENSOR],
        defaults: () => ({
            powerSource: {
                status: PowerSource.PowerSourceStatus.Active,
                order: 0,
                description: "Solar",
                wiredCurrentType: PowerSource.WiredCurrentType.Ac,
            },
            electricalPowerMeasurement: powerDefaults(),
            electricalEnergyMeasurement: energyDefaults(),
        }),
    },
    battery: {
        type: BatteryStorageDevice.with(
            BridgedDeviceBasicInformationServer,
            PowerSourceServer.with(PowerSource.Feature.Battery, PowerSource.Feature.Rechargeable),
            nodeTopology,
            acPower,
            energy,
        ),
        deviceTypes: [dt(0x0018, 1), POWER_SOURCE, ELECTRICAL_SENSOR],
        defaults: () => ({
            powerSource: {
                status: PowerSource.PowerSourceStatus.Active,
                order: 0,
                description: "Battery",
                batChargeLevel: PowerSource.BatChargeLevel.Ok,
                batReplacementNeeded: false,
                batReplaceability: PowerSource.BatReplaceability.NotReplaceable,
                batChargeState: PowerSource.BatChargeState.Unknown,
                batFunctionalWhileCharging: true,
                batPercentRemaining: null,
            },
            electricalPowerMeasurement: powerDefaults(),
            electricalEnergyMeasurement: energyDefaults(),
        }),
    },
    meter: {
        type: ElectricalSensorEndpoint.with(BridgedDeviceBasicInformationServer, nodeTopology, acPower, energy),
        deviceTypes: [ELECTRICAL_SENSOR],
        defaults: () => ({ electricalPowerMeasurement: powerDefaults(), electricalEnergyMeasurement: energyDefaults() }),
    },
    // On/Off Plug-in Unit (0x010A) that also measures its load as an Electrical Sensor.
    plug: {
        type: OnOffPlugInUnitDevice.with(BridgedDeviceBasicInformationServer, HubOnOffServer, nodeTopology, acPower, energy),
        deviceTypes: [dt(OnOffPlugInUnitDevice.deviceType, OnOffPlugInUnitDevice.deviceRevision), ELECTRICAL_SENSOR],
        defaults: () => ({ electricalPowerMeasurement: powerDefaults(), electricalEnergyMeasurement: energyDefaults() }),
    },
};

// ---- node -----------------------------------------------------------------------------------------------------

const server = await ServerNode.create({
    id: "ores-bridge",
    network: { port: Number(opt.port), ipv4: opt.ipv4 !== "0" },
    // The window never opens by itself: the hub asks for it ("start" with window_s, or "open_window").
    commissioning: { passcode: Number(opt.passcode), discriminator: Number(opt.discriminator), enabled: false },
    productDescription: { name: opt["product-name"], deviceType: AggregatorEndpoint.deviceType },
    basicInformation: {
        vendorName: opt["vendor-name"].slice(0, 32),
        vendorId: VendorId(Number(opt["vendor-id"])),
        productName: opt["product-name"].slice(0, 32),
        productLabel: "Energy hub",
        nodeLabel: opt["product-name"].slice(0, 32),
        productId: Number(opt["product-id"]),
        serialNumber: opt.serial.slice(0, 32),
        hardwareVersion: 1,
        hardwareVersionString: "1",
        softwareVersion: 1,
        softwareVersionString: opt.version.slice(0, 64),
    },
});
const aggregator = new Endpoint(AggregatorEndpoint, { id: "aggregator" });
await server.add(aggregator);
const endpoints = new Map();

function isPlainObject(v) {
    return v !== null && typeof v === "object" && !Array.isArray(v);
}
function deepMerge(a, b) {
    const out = { ...a };
    for (const [k, v] of Object.entries(b ?? {})) {
        out[k] = isPlainObject(v) && isPlainObject(a?.[k]) ? deepMerge(a[k], v) : v;
    }
    return out;
}
const ID = /^[A-Za-z0-9_-]{1,64}$/;
const text = (v, fallback, max) => (typeof v === "string" && v ? v : fallback).slice(0, max);

async function addEndpoint(msg) {
    const kind = Object.hasOwn(KINDS, msg.kind) ? KINDS[msg.kind] : undefined;
    if (!kind) throw new Error(`unknown kind ${JSON.stringify(msg.kind)}`);
    if (typeof msg.id !== "string" || !ID.test(msg.id)) throw new Error("id must be 1-64 of A-Z a-z 0-9 _ -");
    if (endpoints.has(msg.id)) throw new Error(`endpoint ${msg.id} exists`);
    if (msg.values !== undefined && !isPlainObject(msg.values)) throw new Error("values must be an object");
    const info = isPlainObject(msg.info) ? msg.info : {};
    const state = deepMerge(kind.defaults(), msg.values ?? {});
    state.id = msg.id;
    state.bridgedDeviceBasicInformation = {
        vendorName: text(info.vendor, "ORES", 32),
        productName: text(info.product, msg.kind, 32),
        nodeLabel: text(info.name, msg.id, 32),
        serialNumber: text(info.serial, msg.id, 32),
        uniqueId: text(info.uniqueId, msg.id, 32),
        reachable: info.reachable !== false,
    };
    if (typeof info.softwareVersion === "string" && info.softwareVersion) {
        state.bridgedDeviceBasicInformation.softwareVersionString = info.softwareVersion.slice(0, 64);
    }
    state.descriptor = { deviceTypeList: kind.deviceTypes };
    const ep = new Endpoint(kind.type, state);
    await aggregator.add(ep);
    endpoints.set(msg.id, ep);
    return { id: msg.id, endpoint: ep.number };
}

function endpointFor(msg) {
    const ep = typeof msg.id === "string" ? endpoints.get(msg.id) : undefined;
    if (!ep) throw new Error(`no endpoint ${JSON.stringify(msg.id)}`);
    return ep;
}

async function handle(msg) {
    switch (msg.op) {
        case "add":
            return addEndpoint(msg);
        case "update": {
            const ep = endpointFor(msg);
            if (!isPlainObject(msg.values)) throw new Error("values must be an object");
            await ep.set(msg.values); // one transaction: all or nothing
            return {};
        }
        case "remove": {
            const ep = endpointFor(msg);
            endpoints.delete(msg.id);
            await ep.delete(); // also forgets the stored endpoint number
            return {};
        }
        case "start": {
            if (server.lifecycle.isOnline) throw new Error("already started");
            await server.start();
            // Workaround (matter.js 0.17.9): the subscriptions behavior is lazy and only loaded at start-up of an
            // already commissioned node, so the first subscription after commissioning would never be recorded.
            await server.act("load-subscriptions", agent => agent.load(SubscriptionsServer));
            startPersistingSubscriptions();
            const windowS = Number(msg.window_s ?? 0);
            if (windowS > 0 && !server.state.commissioning.commissioned) await openWindow(windowS);
            const info = status();
            emit({ event: "ready", ...info });
            started = true;
            return info;
        }
        case "open_window":
            await openWindow(Number(msg.timeout_s ?? 180));
            return status();
        case "close_window":
            await closeWindow();
            return status();
        case "status":
            return status();
        case "endpoints":
            return { endpoints: [...endpoints].map(([id, ep]) => ({ id, endpoint: ep.number })) };
        case "remove_fabric": {
            const fabric = server.env.get(FabricManager).maybeFor(FabricIndex(Number(msg.fabricIndex)));
            if (!fabric) throw new Error(`no fabric ${JSON.stringify(msg.fabricIndex)}`);
            await fabric.delete();
            return status();
        }
        case "stop":
            setImmediate(() => shutdown(0));
            return {};
        default:
            throw new Error(`unknown op ${JSON.stringify(msg.op)}`);
    }
}

// ---- online again after a factory reset -----------------------------------------------------------------------

// When its last fabric is removed, matter.js erases the node's Matter state (a factory reset, as the
// specification asks) and starts it again, with the same endpoints.  Say "ready" again when it is back, so the
// hub re-sends every value; ops that need the node wait for it meanwhile.
let started = false;
let resetting = false; // from "decommissioned" until the node is online again
server.lifecycle.online.on(() => {
    resetting = false;
    if (started && !stopping) emit({ event: "ready", ...status() });
});
async function whenOnline(timeoutMs = 30_000) {
    if (server.lifecycle.isOnline && !resetting) return;
    if (!started) throw new Error("not started");
    await new Promise((resolve, reject) => {
        const timer = setTimeout(() => {
            server.lifecycle.online.off(online);
            reject(new Error("the node did not come back online"));
        }, timeoutMs);
        const online = () => {
            clearTimeout(timer);
            server.lifecycle.online.off(online);
            resolve();
        };
        server.lifecycle.online.on(online);
    });
}

// ---- commissioning window -------------------------------------------------------------------------------------

let windowTimer;
let windowOpen = false;
let closeReason = "commissioned"; // what ends the window unless the timer or a request does
function windowClosed(reason) {
    clearTimeout(windowTimer);
    if (!windowOpen) return;
    windowOpen = false;
    emit({ event: "window", state: "closed", reason });
}
async function openWindow(timeoutS) {
    await whenOnline();
    if (!(timeoutS >= 1 && timeoutS <= 900)) throw new Error("timeout_s must be 1..900");
    const commissioner = server.env.get(DeviceCommissioner);
    clearTimeout(windowTimer);
    if (windowOpen) {
        closeReason = "reopened";
        await commissioner.endCommissioning();
        windowClosed("reopened");
    }
    // Basic commissioning with the node's passcode; the callback runs when a commissioning succeeded.
    closeReason = "commissioned";
    await commissioner.allowBasicCommissioning(() => windowClosed(closeReason));
    windowOpen = true;
    windowTimer = setTimeout(() => {
        closeReason = "timeout";
        commissioner
            .endCommissioning()
            .catch(e => emit({ event: "warning", reason: `closing window: ${e}` }))
            .finally(() => windowClosed("timeout"));
    }, timeoutS * 1000);
    emit({ event: "window", state: "open", timeout_s: timeoutS });
}
async function closeWindow() {
    if (!windowOpen) return;
    closeReason = "request";
    await server.env.get(DeviceCommissioner).endCommissioning();
    windowClosed("request");
}

function fabricList() {
    if (!server.lifecycle.isOnline) return [];
    return server.env.get(FabricManager).fabrics.map(f => ({
        fabricIndex: f.fabricIndex,
        fabricId: String(f.fabricId),
        nodeId: String(f.nodeId),
        vendorId: f.rootVendorId,
        label: f.label,
    }));
}

function status() {
    const c = server.state.commissioning;
    return {
        manualPairingCode: c.pairingCodes.manualPairingCode,
        qrPairingCode: c.pairingCodes.qrPairingCode,
        commissioned: c.commissioned,
        window: windowOpen ? "open" : "closed",
        fabrics: fabricList(),
    };
}

server.events.commissioning.fabricsChanged.on((fabricIndex, action) => emit({ event: "fabrics", fabricIndex, action }));
server.events.commissioning.commissioned.on(() => emit({ event: "commissioned" }));
server.events.commissioning.decommissioned.on(() => {
    resetting = true;
    emit({ event: "decommissioned" });
});

// Workaround (matter.js 0.17.9): the subscriptions behavior keeps its list of active subscriptions in memory and
// writes it to storage only on a clean close, so after a crash the restarted node has no former subscriptions to
// re-establish and controllers only notice after their liveness timeout (60-80 s).  Once a second, rewrite the
// stored list when its set of subscriptions changed (two transactions, so the change is detected and stored).
let persistTimer;
let persistedKey = ""; // nothing stored yet: an empty list needs no write
function plainCopy(v) {
    if (Array.isArray(v)) return v.map(plainCopy);
    if (v && typeof v === "object") return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, plainCopy(x)]));
    return v;
}
async function persistSubscriptions() {
    if (!server.lifecycle.isOnline || stopping) return;
    const list = plainCopy(server.stateOf("subscriptions").subscriptions ?? []);
    const key = list.map(s => `${s.peerAddress.fabricIndex}:${s.subscriptionId}`).sort().join(",");
    if (key === persistedKey) return;
    await server.setStateOf("subscriptions", { subscriptions: [] });
    await server.setStateOf("subscriptions", { subscriptions: list });
    persistedKey = key;
    emit({ event: "subscriptions", count: list.length });
}
function startPersistingSubscriptions() {
    persistTimer = setInterval(
        () => persistSubscriptions().catch(e => emit({ event: "warning", reason: `persisting subscriptions: ${e}` })),
        1000,
    );
}

async function shutdown(code) {
    if (stopping) return;
    stopping = true;
    clearInterval(persistTimer);
    clearTimeout(windowTimer);
    try {
        // Workaround (python-matter-server 7.0.1 with matter.js 0.17.9): a clean close sends BasicInformation's
        // ShutDown event; the controller then marks the node unavailable until *it* re-subscribes.  If the restarted
        // node re-established the former subscription first, the controller would never re-subscribe and the node
        // would stay "unavailable" although reports flow.  So a clean stop forgets the subscriptions (the controller
        // re-subscribes by itself in about 5 s); only a crash restart re-establishes them (about 1 s).
        if (server.lifecycle.isOnline) await server.setStateOf("subscriptions", { subscriptions: [] });
        await server.close();
    } catch (e) {
        process.stderr.write(`shutdown: ${e?.stack ?? e}\n`);
    } finally {
        emit({ event: "stopped" });
        process.exit(code);
    }
}

// ---- the channel: one message at a time, in order; each gets a "result" or "error" carrying its "seq" -----------

let chain = Promise.resolve();
const rl = createInterface({ input: process.stdin });
rl.on("line", line => {
    chain = chain.then(async () => {
        if (stopping || !line.trim()) return;
        let msg;
        try {
            msg = JSON.parse(line);
            if (!isPlainObject(msg)) throw new Error("not a JSON object");
        } catch (e) {
            emit({ event: "error", seq: null, op: null, reason: `bad message: ${e.message}` });
            return;
        }
        const seq = Number.isSafeInteger(msg.seq) ? msg.seq : null;
        const op = typeof msg.op === "string" ? msg.op : null;
        try {
            const result = await handle(msg);
            emit({ event: "result", seq, op, ...result });
        } catch (e) {
            emit({ event: "error", seq, op, reason: String(e?.message ?? e) });
        }
    });
});
rl.on("close", () => chain.then(() => shutdown(0)));
process.on("SIGTERM", () => shutdown(0));
process.on("SIGINT", () => shutdown(0));
emit({ event: "hello", pid: process.pid, protocol: PROTOCOL, matterjs: MATTER_JS });

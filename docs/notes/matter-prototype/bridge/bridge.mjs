// Prototype Matter bridge: a matter.js ServerNode with an Aggregator whose bridged endpoints are created,
// updated and removed by JSON lines on stdin; events (ready, commissioned, fabrics, commands, errors) are JSON
// lines on stdout.  All matter.js logging goes to stderr.  Knows nothing of ORES: only endpoint kinds and
// cluster values in Matter units.
//
// usage: node bridge.mjs storage=DIR [port=5540] [passcode=20202021] [discriminator=3840]
//                        [vendor-id=0xFFF1] [product-id=0x8000] [log-level=notice] [ipv4=1] [interface=NAME]
import { createInterface } from "node:readline";

// Options are positional key=value pairs, not --flags: matter.js parses every --flag of process.argv into its own
// configuration variables (a --storage flag made it fail with "segment storage is not a map").
const opt = {
    port: "5540",
    passcode: "20202021",
    discriminator: "3840",
    "vendor-id": "0xFFF1",
    "product-id": "0x8000",
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
// matter.js reads MATTER_* variables and --flags when it is imported: set ours before the import.
process.env.MATTER_STORAGE_PATH = opt.storage;
process.env.MATTER_PATH_ROOT = opt.storage;
process.env.MATTER_LOG_FORMAT = "plain";
if (opt.ipv4 === "0") process.env.MATTER_MDNS_IPV4 = "false"; // mDNS over IPv6 only
if (opt.interface) process.env.MATTER_MDNS_NETWORKINTERFACE = opt.interface; // advertise on one interface only

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
const { DeviceCommissioner, FabricManager } = await import("@matter/main/protocol");
const { FabricIndex } = await import("@matter/main/types");
const { ElectricalSensorEndpoint } = await import("@matter/main/endpoints/electrical-sensor");
const { PowerSourceEndpoint } = await import("@matter/main/endpoints/power-source");

Logger.level = opt["log-level"];
Logger.format = "plain";
Logger.destinations.default.write = text => process.stderr.write(text + "\n");

function emit(obj) {
    process.stdout.write(JSON.stringify(obj) + "\n");
}

// ---- endpoint kinds -------------------------------------------------------------------------------------------

// A plug's On/Off commands are reported to the hub; the state change is applied optimistically (the hub confirms
// or reverts it with an "update").
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
        // report the resulting state once (the base toggle() would call this.on()/this.off() and report twice)
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

function powerDefaults() {
    return {
        powerMode: ElectricalPowerMeasurement.PowerMode.Ac,
        numberOfMeasurementTypes: 1,
        accuracy: [
            {
                measurementType: 5, // MeasurementType.ActivePower
                measured: true,
                minMeasuredValue: -MAX_MW,
                maxMeasuredValue: MAX_MW,
                accuracyRanges: [{ rangeMin: -MAX_MW, rangeMax: MAX_MW, fixedMax: 1000 }],
            },
        ],
        activePower: null,
    };
}
function energyDefaults() {
    const acc = {
        measurementType: 14, // MeasurementType.ElectricalEnergy
        measured: true,
        minMeasuredValue: 0,
        maxMeasuredValue: 1e15,
        accuracyRanges: [{ rangeMin: 0, rangeMax: 1e15, fixedMax: 1000 }],
    };
    return { accuracy: acc, cumulativeEnergyImported: null, cumulativeEnergyExported: null };
}
const dt = (deviceType, revision) => ({ deviceType, revision });

const KINDS = {
    // Solar Power (0x0017) + Power Source (0x0011) + Electrical Sensor (0x0510) utility types on one endpoint.
    solar: {
        type: SolarPowerDevice.with(
            BridgedDeviceBasicInformationServer,
            PowerSourceServer.with(PowerSource.Feature.Wired),
            nodeTopology,
            acPower,
            energy,
        ),
        deviceTypes: [dt(0x0017, 1), dt(PowerSourceEndpoint.deviceType, 1), dt(ElectricalSensorEndpoint.deviceType, 1)],
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
    // Battery Storage (0x0018) + Power Source + Electrical Sensor.
    battery: {
        type: BatteryStorageDevice.with(
            BridgedDeviceBasicInformationServer,
            PowerSourceServer.with(PowerSource.Feature.Battery, PowerSource.Feature.Rechargeable),
            nodeTopology,
            acPower,
            energy,
        ),
        deviceTypes: [dt(0x0018, 1), dt(PowerSourceEndpoint.deviceType, 1), dt(ElectricalSensorEndpoint.deviceType, 1)],
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
    // Electrical Sensor (0x0510) alone: the grid meter.
    meter: {
        type: ElectricalSensorEndpoint.with(BridgedDeviceBasicInformationServer, nodeTopology, acPower, energy),
        deviceTypes: [dt(ElectricalSensorEndpoint.deviceType, 1)],
        defaults: () => ({ electricalPowerMeasurement: powerDefaults(), electricalEnergyMeasurement: energyDefaults() }),
    },
    plug: {
        type: OnOffPlugInUnitDevice.with(BridgedDeviceBasicInformationServer, HubOnOffServer),
        deviceTypes: null, // matter.js fills in On/Off Plug-in Unit; Bridged Node is added by the BDBI server
        defaults: () => ({}),
    },
};

// ---- node -----------------------------------------------------------------------------------------------------

const server = await ServerNode.create({
    id: "ores-bridge",
    // ipv4=0 avoids a harmless "addMembership ENODEV" warning on IPv6-only links (the test namespaces)
    network: { port: Number(opt.port), ipv4: opt.ipv4 !== "0" },
    commissioning: { passcode: Number(opt.passcode), discriminator: Number(opt.discriminator) },
    productDescription: { name: "ORES Hub", deviceType: AggregatorEndpoint.deviceType },
    basicInformation: {
        vendorName: "ORES",
        vendorId: VendorId(Number(opt["vendor-id"])),
        productName: "ORES Hub",
        productLabel: "Energy hub",
        hardwareVersion: 1,
        hardwareVersionString: "1",
        softwareVersion: 1,
        softwareVersionString: "0.1.0",
        nodeLabel: "ORES Hub",
        productId: Number(opt["product-id"]),
        serialNumber: "ores-proto-0001",
    },
});
const aggregator = new Endpoint(AggregatorEndpoint, { id: "aggregator" });
await server.add(aggregator);
const endpoints = new Map();

function deepMerge(a, b) {
    const out = { ...a };
    for (const [k, v] of Object.entries(b ?? {})) {
        out[k] = v && typeof v === "object" && !Array.isArray(v) && a?.[k] && typeof a[k] === "object" ? deepMerge(a[k], v) : v;
    }
    return out;
}

async function addEndpoint(msg) {
    const kind = KINDS[msg.kind];
    if (!kind) throw new Error(`unknown kind ${JSON.stringify(msg.kind)}`);
    if (typeof msg.id !== "string" || !/^[A-Za-z0-9_-]{1,64}$/.test(msg.id)) throw new Error("bad id");
    if (endpoints.has(msg.id)) throw new Error(`endpoint ${msg.id} exists`);
    const info = msg.info ?? {};
    const state = deepMerge(kind.defaults(), msg.values ?? {});
    state.id = msg.id;
    state.bridgedDeviceBasicInformation = {
        vendorName: info.vendor ?? "ORES",
        productName: info.product ?? msg.kind,
        nodeLabel: (info.name ?? msg.id).slice(0, 32),
        serialNumber: (info.serial ?? msg.id).slice(0, 32),
        uniqueId: (info.uniqueId ?? `ores-${msg.id}`).slice(0, 32),
        reachable: info.reachable ?? true,
    };
    if (kind.deviceTypes) state.descriptor = { deviceTypeList: kind.deviceTypes };
    const ep = new Endpoint(kind.type, state);
    await aggregator.add(ep);
    endpoints.set(msg.id, ep);
    return { endpoint: ep.number };
}

async function handle(msg) {
    switch (msg.op) {
        case "add":
            return addEndpoint(msg);
        case "update": {
            const ep = endpoints.get(msg.id);
            if (!ep) throw new Error(`no endpoint ${msg.id}`);
            await ep.set(msg.values);
            return {};
        }
        case "remove": {
            const ep = endpoints.get(msg.id);
            if (!ep) throw new Error(`no endpoint ${msg.id}`);
            endpoints.delete(msg.id);
            await ep.delete(); // delete also forgets the stored endpoint number
            return {};
        }
        case "start":
            await server.start();
            // Workaround (matter.js 0.17.9): the subscriptions behavior is lazy and is only loaded at start-up of an
            // already commissioned node, so the first subscription after commissioning is never recorded.  Load it.
            await server.act("load-subscriptions", agent => agent.load(SubscriptionsServer));
            startPersistingSubscriptions();
            return ready();
        case "open_window": {
            // Basic commissioning window with the node's passcode, closed after success or timeout.
            const timeout = Number(msg.timeout_s ?? 180);
            if (!(timeout >= 1 && timeout <= 900)) throw new Error("timeout_s must be 1..900");
            const dc = server.env.get(DeviceCommissioner);
            clearTimeout(windowTimer);
            await dc.allowBasicCommissioning(() => {
                clearTimeout(windowTimer);
                emit({ event: "window", state: "closed" });
            });
            windowTimer = setTimeout(() => dc.endCommissioning().catch(() => {}), timeout * 1000);
            emit({ event: "window", state: "open", timeout_s: timeout });
            return ready();
        }
        case "close_window":
            clearTimeout(windowTimer);
            await server.env.get(DeviceCommissioner).endCommissioning();
            return {};
        case "fabrics":
            return { fabrics: fabricList() };
        case "remove_fabric": {
            const fm = server.env.get(FabricManager);
            const fabric = fm.maybeFor(FabricIndex(Number(msg.fabricIndex)));
            if (!fabric) throw new Error(`no fabric ${msg.fabricIndex}`);
            await fabric.delete();
            return { fabrics: fabricList() };
        }
        case "x_subscriptions":
            return { subscriptions: JSON.parse(JSON.stringify(server.state.subscriptions, (k, v) => (typeof v === "bigint" ? String(v) : v))) };
        case "stop":
            await shutdown(0);
            return {};
        default:
            throw new Error(`unknown op ${JSON.stringify(msg.op)}`);
    }
}

let windowTimer;
function fabricList() {
    return server.env.get(FabricManager).fabrics.map(f => ({
        fabricIndex: f.fabricIndex,
        fabricId: String(f.fabricId),
        nodeId: String(f.nodeId),
        vendorId: f.rootVendorId,
        label: f.label,
    }));
}

function ready() {
    const c = server.state.commissioning;
    const info = {
        manualPairingCode: c.pairingCodes.manualPairingCode,
        qrPairingCode: c.pairingCodes.qrPairingCode,
        commissioned: c.commissioned,
        fabrics: Object.values(c.fabrics).map(f => ({ fabricIndex: f.fabricIndex, vendorId: f.rootVendorId, label: f.label })),
    };
    emit({ event: "ready", ...info });
    return info;
}

server.events.commissioning.fabricsChanged.on((fabricIndex, action) => emit({ event: "fabrics", fabricIndex, action }));
server.events.commissioning.commissioned.on(() => emit({ event: "commissioned" }));

// Workaround (matter.js 0.17.9): SubscriptionsServer keeps the list of active subscriptions in memory but writes it
// to storage only on a clean close, so after a SIGKILL the restarted node has no "former subscriptions" to
// re-establish and the controller only notices after its subscription liveness timeout (~60-75 s).  A 1 s check
// rewrites the list whenever its set of subscriptions changed (two transactions, so the change is detected and
// stored).  The sessions events are not a reliable trigger: they did not fire for a controller's re-subscription.
let persistTimer;
let persistedKey = null;
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
    if (process.env.ORES_MATTER_NO_SUB_PERSIST) return;
    persistTimer = setInterval(
        () => persistSubscriptions().catch(e => emit({ event: "warning", reason: `persist subscriptions: ${e}` })),
        1000,
    );
}

let stopping = false;
async function shutdown(code) {
    if (stopping) return;
    stopping = true;
    try {
        // Workaround (python-matter-server 7.0.1 + matter.js 0.17.9): a clean close sends the ShutDown event, on which
        // the controller marks the node unavailable and waits for its own re-subscription to mark it available again.
        // If the restarted node re-establishes its former subscription first, that re-subscription never happens and
        // the node stays "unavailable" although reports flow.  So forget the subscriptions on a clean stop: the
        // controller re-subscribes by itself (~5 s); only a crash restart re-establishes them (~1 s).
        clearInterval(persistTimer);
        if (server.lifecycle.isOnline) await server.setStateOf("subscriptions", { subscriptions: [] });
        await server.close();
    } finally {
        emit({ event: "stopped" });
        process.exit(code);
    }
}

// One message at a time, in order: each line gets a "result" or "error" reply carrying its "seq" (if any).
let chain = Promise.resolve();
const rl = createInterface({ input: process.stdin });
rl.on("line", line => {
    chain = chain.then(async () => {
        if (!line.trim()) return;
        let msg;
        try {
            msg = JSON.parse(line);
            if (!msg || typeof msg !== "object" || Array.isArray(msg)) throw new Error("not a JSON object");
        } catch (e) {
            emit({ event: "error", reason: `bad JSON: ${e.message}` });
            return;
        }
        try {
            const result = await handle(msg);
            emit({ event: "result", seq: msg.seq ?? null, op: msg.op, ...result });
        } catch (e) {
            emit({ event: "error", seq: msg.seq ?? null, op: msg.op, reason: String(e?.message ?? e) });
        }
    });
});
rl.on("close", () => chain.then(() => shutdown(0)));
process.on("SIGTERM", () => shutdown(0));
process.on("SIGINT", () => shutdown(0));
emit({ event: "hello", pid: process.pid, matterjs: "0.17.9" });

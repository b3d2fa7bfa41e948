// Reads users and attendance from one terminal with zkteco-js, `tries` times in a row, and prints one
// JSON line per try: {"users": N, "records": N, "error": "..." | null}.
// Usage: node read_terminal.js MODULE_DIR HOST PORT TRIES
const path = require("path");
const [moduleDir, host, port, tries] = process.argv.slice(2);
const Zkteco = require(path.join(moduleDir, "node_modules", "zkteco-js"));

// zkteco-js logs every step on the console; only our JSON lines go to stdout.
console.log = () => {};
console.error = (...a) => process.stderr.write(a.map(String).join(" ") + "\n");

async function once() {
  const device = new Zkteco(host, Number(port), 5000, 5000);
  const result = { users: 0, records: 0, error: null };
  try {
    await device.createSocket();
    const users = await device.getUsers();
    result.users = users.data.length;
    const logs = await device.getAttendances();
    result.records = logs.data.length;
    if (logs.err) result.error = String(logs.err);
  } catch (err) {
    result.error = String(err && err.message ? err.message : err);
  } finally {
    try {
      await device.disconnect();
    } catch (err) {
      // the terminal closes the session on EXIT; a failed goodbye changes nothing
    }
  }
  return result;
}

(async () => {
  for (let i = 0; i < Number(tries); i++) {
    process.stdout.write(JSON.stringify(await once()) + "\n");
  }
  process.exit(0);
})();
